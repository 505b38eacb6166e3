"""How a run spreads over processes: one process, DDP, or FSDP2. The trainer asks its strategy and never branches.

- :class:`SingleProcess`: ``accelerate.prepare`` (a no-op wrapper here), accelerate's clipping, nothing to gather.
- :class:`DDP`: the same through accelerate's DDP wrapper, which averages the student's gradients; the objective's
  own parameters (DAC-KL's) are in no wrapper, so their gradients are averaged here.
- :class:`FSDP2`: the student and every model the teacher runs here (``Teacher.models()``: a local teacher's, each
  local member of several teachers') sharded per decoder layer by ``train/fsdp.py`` (not by ``prepare``:
  accelerate ignores FSDP on CPU processes); generation decodes on gathered weights, the teacher's root groups are
  released after each micro-batch, clipping takes the global norm over DTensors, checkpoints are full
  state dicts gathered on every rank (or each rank's shards with ``checkpoint_format: sharded``).

A strategy gives the trainer: ``prepare``, ``unwrap``, ``full_student`` (the plain model, for exports),
``checkpoint_views`` and ``gather_for_save``, ``no_sync``, ``after_micro_batch``, ``clip``, ``sync_objective_grads``,
``generation`` (the context generation runs in) and ``memory_report``.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from lmdistill.train.fsdp import (FullOptimizer, FullState, ShardedOptimizer, ShardedState, all_reduce_grads,
                                  clip_grad_norm, fsdp_requested, full_state_dict, gathered, local_param_bytes,
                                  release, shard)


class SingleProcess:
    name = "single process"

    def __init__(self, acc, cfg):
        self.acc, self.cfg = acc, cfg
        self.rank, self.world = acc.process_index, acc.num_processes

    def shard_models(self, student, teacher) -> None:
        """Spread the models over the processes before the optimiser is made (FSDP2 only)."""

    def prepare(self, student, teacher, optimizer):
        """The student and the optimiser as the loop uses them (``teacher``: the run's Teacher, or ``None``)."""
        return self.acc.prepare(student, optimizer)

    def unwrap(self, student):
        return self.acc.unwrap_model(student)

    def full_student(self, student, load_student):
        """A plain, unsharded student on rank 0 (``None`` on the others)."""
        return self.unwrap(student) if self.rank == 0 else None

    def checkpoint_views(self, student, objective, optimizer) -> tuple[dict, object]:
        """What the checkpoint module saves and loads: the modules by name and the optimiser."""
        return {"student": self.unwrap(student), "objective": objective}, optimizer

    def gather_for_save(self, modules: dict, optimizer) -> None:
        pass

    def no_sync(self, student, last: bool):
        """Gradients synchronise on the last micro-batch of a step only."""
        return nullcontext() if last else self.acc.no_sync(student)

    def after_micro_batch(self, teacher) -> None:
        pass

    def clip(self, params, max_norm: float):
        return self.acc.clip_grad_norm_(params, max_norm)

    def sync_objective_grads(self, params) -> None:
        pass

    def generation(self, student, teacher_model):
        """The context on-policy generation runs in (``teacher_model``: the teacher when the policy samples from it)."""
        return nullcontext()

    def memory_report(self, student, teacher) -> dict | None:
        return None


class DDP(SingleProcess):
    name = "DDP"

    def sync_objective_grads(self, params) -> None:
        all_reduce_grads(list(params), self.world)   # DAC-KL's parameters are in no DDP wrapper


class FSDP2(SingleProcess):
    name = "FSDP2"

    def prepare(self, student, teacher, optimizer):
        return student, optimizer   # sharded before the optimiser was built (shard_models); FSDP2 syncs gradients

    def shard_models(self, student, teacher) -> None:
        """Shard the student, and each model the teacher runs here frozen (eval, no gradients, no optimiser state);
        before the optimiser is made, so it holds the sharded parameters."""
        bf16 = self.acc.mixed_precision == "bf16"
        shard(student, bf16=bf16)
        for model in teacher.models() if teacher is not None else ():
            shard(model, frozen=True, bf16=bf16)

    def unwrap(self, student):
        return student   # the sharded model itself: parameters are DTensors; full_student() gathers them

    def full_student(self, student, load_student):
        state = full_state_dict(student)   # a collective: every rank gathers
        if self.rank != 0:
            return None
        with torch.random.fork_rng(devices=[]):   # building a model draws random numbers: keep the run's stream
            model = load_student(self.cfg, "cpu")
        model.load_state_dict(state)
        return model

    @property
    def sharded_checkpoints(self) -> bool:
        return self.cfg.checkpoint_format == "sharded"

    def checkpoint_views(self, student, objective, optimizer) -> tuple[dict, object]:
        if self.sharded_checkpoints:
            return {"student": ShardedState(student), "objective": objective}, ShardedOptimizer(optimizer)
        return {"student": FullState(student), "objective": objective}, FullOptimizer(optimizer)

    def gather_for_save(self, modules: dict, optimizer) -> None:
        modules["student"].gather()   # full: collectives on every rank, rank 0 writes; sharded: no-ops
        optimizer.gather()

    def no_sync(self, student, last: bool):
        return nullcontext()

    def after_micro_batch(self, teacher) -> None:
        for model in teacher.models() if teacher is not None else ():   # the teacher back to its shards
            release(model)

    def clip(self, params, max_norm: float):
        return clip_grad_norm(params, max_norm)

    def sync_objective_grads(self, params) -> None:
        if self.world > 1:
            all_reduce_grads(list(params), self.world)

    def generation(self, student, teacher_model):
        return gathered(student, teacher_model)   # every rank gathers, whatever its source decides

    def memory_report(self, student, teacher) -> dict:
        """Parameter bytes each rank holds for the student and the teacher (local shards) and their full sizes (a
        collective; written to ``fsdp.json``)."""
        report = {"world_size": self.world}
        models = teacher.models() if teacher is not None else []
        named = [("teacher" if len(models) == 1 else f"teacher.{i}", m) for i, m in enumerate(models)]
        for name, model in [("student", student), *named]:
            local = [None] * self.world
            torch.distributed.all_gather_object(local, local_param_bytes(model))
            report[name] = {"full_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                            "local_bytes": local}
        return report


def make_strategy(acc, cfg) -> SingleProcess:
    """FSDP2 when the launcher asked for it (``configs/accelerate/fsdp2.yaml``), DDP over several processes, else one."""
    if fsdp_requested():
        return FSDP2(acc, cfg)
    return DDP(acc, cfg) if acc.num_processes > 1 else SingleProcess(acc, cfg)
