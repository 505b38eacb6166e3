"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer: the student and the teacher sharded per decoder
layer, generation on gathered weights, checkpoints and exports as full state dicts.

Why the trainer shards the models itself instead of ``Accelerator.prepare``: accelerate (1.16) turns FSDP on only
for accelerator devices; on CPU processes (``distributed_type`` MULTI_CPU) it ignores the FSDP settings and would
wrap the model in DDP. Sharding here runs the same code on CPU/gloo (where it is tested) and on GPUs. The launcher
config (``configs/accelerate/fsdp2.yaml``) only has to say FSDP version 2: ``accelerate launch`` passes it on as
``ACCELERATE_USE_FSDP=true`` / ``FSDP_VERSION=2``, which :func:`fsdp_requested` reads.

- **Sharding** (:func:`shard`): ``fully_shard`` on every decoder layer, then on the root (embeddings, final norm
  and LM head, tied or not, form the root's group). The student's root keeps FSDP's default after forward (its
  parameters stay gathered until backward); the teacher is put in eval mode with ``requires_grad=False`` (no
  gradients, no optimiser state); its layers are freed after each forward and its root group (embeddings, norm,
  LM head, which the losses apply outside the forward) after each micro-batch's objective, so each process holds
  about ``1/N`` of the teacher between micro-batches (one layer plus the root group in full during a forward).
- **Generation** (:func:`gathered`): decoding runs a different number of forwards on each process (rows stop at
  EOS), which per-layer all-gathers inside forward would deadlock. So every FSDP group of the student (and of the
  teacher, for policies that sample from it) is unsharded once before decoding and kept unsharded through it
  (resharding after forward is switched off meanwhile), then resharded: decoding is purely local on full weights.
  The price: the full model is held during generation (peak memory as unsharded, between forwards it is 1/N).
- **Checkpoints and export** (:class:`FullState`, :func:`full_optimizer_state`): every DTensor is gathered
  (``full_tensor()``, on all ranks in the same order) and rank 0 writes the same files as a one-process run (the
  student's full state dict, the optimiser's state with full tensors). Loading gives every rank the full tensors
  and each takes its own shard (``distribute_tensor(..., src_data_rank=None)``: no communication), so a checkpoint
  resumes under any number of processes, FSDP2 or not. With ``checkpoint_format=sharded``
  (:class:`ShardedState`, :class:`ShardedOptimizer`) nothing is gathered: every rank writes its own shards of the
  student and of the optimiser state (``student-rankR.pt``, ``optimizer-rankR.pt``), so no process ever holds the
  full state, and the checkpoint resumes under the same number of processes (the export to ``final/`` is still
  the full model).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

from lmdistill.errors import ConfigError


def fsdp_requested() -> bool:
    """True when the launcher asked for FSDP (``accelerate launch`` with an FSDP config); FSDP version 1 and a
    missing ``torch.distributed`` are refused with a ``ConfigError``."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(f"FSDP version {version} is not supported: lmdistill trains with FSDP2 only; set "
                          "fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp2.yaml)")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ConfigError("FSDP2 needs torch.distributed: launch with `accelerate launch --config_file "
                          "configs/accelerate/fsdp2.yaml --num_processes N -m lmdistill train ...`")
    return True


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of an HF causal LM (peft-wrapped or not); a ``ConfigError`` when there are none."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError(f"FSDP2: cannot find the decoder layers of {type(inner).__name__} (no get_decoder().layers)")
    return list(layers)


def shard(model: nn.Module, *, frozen: bool = False, bf16: bool = False) -> nn.Module:
    """``fully_shard`` every decoder layer of ``model``, then the root (in place; parameters become DTensors).

    ``frozen`` (the teacher): eval mode, ``requires_grad=False``, and the root's group freed after each forward too.
    ``bf16``: compute in bfloat16 over float32 shards (gradients reduced in float32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if frozen:
        model.eval()
        model.requires_grad_(False)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp, reshard_after_forward=True)
    # the root (embeddings, final norm, LM head) stays gathered after the forward: the losses apply the LM head to
    # hidden states outside it (``selected_logits``, the chunked kernels). The student's is freed by FSDP after
    # backward; the teacher's by the trainer after each micro-batch's objective (:func:`release`).
    fully_shard(model, mp_policy=mp, reshard_after_forward=False if frozen else None)
    return model


def release(model) -> None:
    """Free the gathered root group of a sharded frozen model (the teacher) after its logits are used."""
    if model is not None and is_sharded(model):
        model.reshard()


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameters this process holds for ``model``: each DTensor's local shard, or the whole tensor."""
    total = 0
    for p in model.parameters():
        t = p.to_local() if _is_dtensor(p) else p
        total += t.numel() * t.element_size()
    return total


def _groups(model: nn.Module):
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            state = m._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:   # torch before 2.9 had one group per state
                group = getattr(state, "_fsdp_param_group", None)
                groups = [group] if group is not None else []
            yield m, state, list(groups)


@contextmanager
def gathered(*models):
    """Every FSDP2 group of ``models`` (``None`` and unsharded models are skipped) unsharded on entry and kept
    unsharded through any number of forwards, then resharded: local decoding on full weights. A collective: every
    rank enters and leaves together."""
    models = [m for m in models if m is not None and is_sharded(m)]
    saved = []
    for model in models:
        model._get_fsdp_state()._lazy_init()   # as the first forward would (it would reset the root's setting)
        for m, _state, groups in _groups(model):
            for g in groups:
                saved.append((g, g.post_forward_mesh_info))
                g.post_forward_mesh_info = None   # no reshard after forward while gathered
            m.unshard()
    try:
        yield
    finally:
        for g, info in saved:
            g.post_forward_mesh_info = info
        for model in models:
            for m, _state, _groups_ in _groups(model):
                m.reshard()


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if _is_dtensor(t) else t).detach().cpu()


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` as a DTensor placed as ``like`` (this rank's shard, taken locally), or ``full`` itself."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def full_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` with every DTensor gathered to a full CPU tensor (a collective)."""
    return {k: _full(v) for k, v in model.state_dict().items()}


def load_full_state_dict(model: nn.Module, state: dict, strict: bool = True):
    """Load a full state dict (one-process format) into an FSDP2-sharded ``model``: each rank takes its shards."""
    current = model.state_dict()
    missing = [k for k in current if k not in state]
    unexpected = [k for k in state if k not in current]
    if strict and (missing or unexpected):
        raise RuntimeError(f"state dict does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in state.items():
        if k in current and tuple(v.shape) != tuple(current[k].shape):
            raise RuntimeError(f"size mismatch for {k}: checkpoint {tuple(v.shape)}, model {tuple(current[k].shape)}")
    return model.load_state_dict({k: _shard_like(v, current[k]) for k, v in state.items() if k in current},
                                 strict=strict)


class FullState:
    """A sharded module as :mod:`lmdistill.train.checkpoint` sees it: ``state_dict()`` is the full state dict
    gathered by :meth:`gather` (called on every rank before the save), ``load_state_dict`` shards a full one."""

    def __init__(self, model: nn.Module):
        self.model, self._full = model, None

    def gather(self) -> "FullState":
        self._full = full_state_dict(self.model)
        return self

    def state_dict(self) -> dict:
        if self._full is None:
            raise RuntimeError("FullState.state_dict() before gather()")
        return self._full

    def load_state_dict(self, state: dict):
        return load_full_state_dict(self.model, state)


class FullOptimizer:
    """An optimiser over (partly) DTensor parameters as the checkpoint module sees it: ``state_dict()`` with full
    tensors (gathered by :meth:`gather` on every rank), ``load_state_dict`` of a full one (each rank its shards)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer, self._full = optimizer, None

    def _params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def gather(self) -> "FullOptimizer":
        sd = self.optimizer.state_dict()
        sd["state"] = {i: {k: _full(v) if torch.is_tensor(v) else v for k, v in s.items()}
                       for i, s in sorted(sd["state"].items())}
        self._full = sd
        return self

    def state_dict(self) -> dict:
        if self._full is None:
            raise RuntimeError("FullOptimizer.state_dict() before gather()")
        return self._full

    def load_state_dict(self, state: dict) -> None:
        params = self._params()
        out = {"param_groups": state["param_groups"], "state": {}}
        for i, s in state["state"].items():
            p = params[int(i)]
            out["state"][i] = {k: _shard_like(v, p) if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape)
                                  and v.ndim > 0 else v for k, v in s.items()}
        self.optimizer.load_state_dict(out)


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if _is_dtensor(t) else t).detach()


class ShardedState:
    """A sharded module as :mod:`lmdistill.train.checkpoint` sees it with ``checkpoint_format=sharded``:
    ``state_dict()`` is this rank's shards (local tensors, no communication), written by every rank;
    ``load_state_dict`` copies them back into the same shards."""

    per_rank = True

    def __init__(self, model: nn.Module):
        self.model = model

    def gather(self) -> "ShardedState":   # nothing to gather: the same call sequence as FullState
        return self

    def state_dict(self) -> dict:
        return {k: _local(v).cpu().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict):
        current = self.model.state_dict()
        if current.keys() != state.keys():
            missing, unexpected = sorted(current.keys() - state.keys()), sorted(state.keys() - current.keys())
            raise RuntimeError(f"shards do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for k, v in current.items():
                mine = _local(v)
                if tuple(mine.shape) != tuple(state[k].shape):
                    raise RuntimeError(f"shard size mismatch for {k}: checkpoint {tuple(state[k].shape)}, "
                                       f"this rank {tuple(mine.shape)}")
                mine.copy_(state[k])


class ShardedOptimizer:
    """An optimiser over DTensor parameters with ``checkpoint_format=sharded``: ``state_dict()`` with this rank's
    local shards of every state tensor, ``load_state_dict`` of the same (rewrapped as DTensors placed as the
    parameters)."""

    per_rank = True

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def gather(self) -> "ShardedOptimizer":
        return self

    def state_dict(self) -> dict:
        sd = self.optimizer.state_dict()
        sd["state"] = {i: {k: _local(v).cpu().clone() if torch.is_tensor(v) else v for k, v in s.items()}
                       for i, s in sorted(sd["state"].items())}
        return sd

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.tensor import DTensor

        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        out = {"param_groups": state["param_groups"], "state": {}}
        for i, s in state["state"].items():
            p = params[int(i)]
            local = _local(p)

            def wrap(v):
                if not (_is_dtensor(p) and torch.is_tensor(v) and v.ndim > 0):
                    return v
                if tuple(v.shape) != tuple(local.shape):
                    raise RuntimeError(f"optimiser shard size mismatch for parameter {i}: checkpoint "
                                       f"{tuple(v.shape)}, this rank {tuple(local.shape)}")
                return DTensor.from_local(v.to(local.device, local.dtype), p.device_mesh, p.placements,
                                          run_check=False, shape=p.shape, stride=p.stride())

            out["state"][i] = {k: wrap(v) for k, v in s.items()}
        self.optimizer.load_state_dict(out)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over a mix of DTensor (sharded) and plain parameters: the global L2 norm
    of all gradients (sharded ones reduced across ranks), every gradient scaled by ``min(1, max_norm / norm)``."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if _is_dtensor(g)]
    plain = [g for g in grads if not _is_dtensor(g)]
    sq = torch.zeros((), dtype=torch.float32)
    if sharded:
        sq = sq + torch.nn.utils.get_total_norm(sharded).full_tensor().float().cpu() ** 2
    if plain:
        sq = sq + torch.nn.utils.get_total_norm(plain).float().cpu() ** 2
    total = sq.sqrt()
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    for g in grads:
        g.mul_(coef)
    return total


def all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average the gradients of parameters that neither DDP nor FSDP synchronise (the objective's own, e.g.
    DAC-KL's), so every rank takes the same optimiser step."""
    params = [p for p in params if not _is_dtensor(p)]
    if not params:
        return
    has = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    torch.distributed.all_reduce(has, op=torch.distributed.ReduceOp.MAX)
    for p, any_grad in zip(params, has.tolist()):
        if not any_grad:
            continue   # no rank has a gradient: the parameter skips the step, as in one process
        if p.grad is None:   # another rank's batch gave it one: take part with zeros
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
        p.grad.div_(world)
