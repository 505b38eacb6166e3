"""Running a causal LM for a loss: logits at every position, at trained positions only, or hidden states.

Logits computed here from hidden states are the model's own: its LM head, then what its forward applies after it
(soft-capping, scaling; :mod:`.model_logits`).

Every forward takes position ids from the attention mask, so padding (left or right) never shifts them. The model
may be wrapped (DDP ``.module``, peft); gradients flow through the wrapper so they still synchronise.
"""

from __future__ import annotations

import torch

from lmdistill.errors import ConfigError
from lmdistill.losses.model_logits import (LogitTransform, base_model, head_logits, logit_transform,
                                           require_logit_transform)


def unwrap(model):
    """The model inside a DDP/FSDP wrapper (``.module``), or the model itself."""
    return model.module if hasattr(model, "module") else model


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def forward_logits(model, batch: dict) -> torch.Tensor:
    """Logits ``[B, T, V]`` at every position of ``batch`` (``input_ids``, ``attention_mask``)."""
    attn = batch["attention_mask"]
    return model(input_ids=batch["input_ids"], attention_mask=attn, position_ids=positions(attn)).logits


def _decoder_run(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Final (normed) hidden states ``[B, T, H]`` and the forward's own logits at the last position ``[B, 1, V]``.

    The model runs with ``logits_to_keep=1``; a forward hook on its decoder catches ``last_hidden_state``. Works for
    every HF causal LM with ``get_decoder()``.
    """
    inner = base_model(model)
    caught = {}

    def hook(_module, _inputs, output):
        caught["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = inner.get_decoder().register_forward_hook(hook)
    try:
        attn = batch["attention_mask"]
        out = model(input_ids=batch["input_ids"], attention_mask=attn, position_ids=positions(attn), logits_to_keep=1)
    finally:
        handle.remove()
    return caught["h"], out.logits


def _check_last(model, transform: LogitTransform, h: torch.Tensor, last: torch.Tensor) -> None:
    """Refuse a model whose forward's last-position logits are not its head plus ``transform`` on ``h``: the table in
    ``model_logits.py`` would be wrong for it (another transformers version, a patched forward). Tolerance: a few
    units in the last place of the logits' dtype; one extra ``[B, H] x [H, V]`` product, no gradient."""
    with torch.no_grad():
        ours = head_logits(model, h[:, -1:].detach(), transform)
        tol = max(8 * torch.finfo(ours.dtype).eps, 8 * torch.finfo(last.dtype).eps, 1e-5)
        ours, theirs = ours.float(), last[:, -1:].detach().float()
        bad = (ours - theirs).abs() > tol * (1 + theirs.abs())
        if bool(bad.any()):
            diff = float((ours - theirs).abs().max())
            raise ConfigError(f"model type {transform.model_type!r}: its forward's logits differ from its LM head "
                              f"followed by {transform.describe()} (max |difference| {diff:.3g}); lmdistill's table "
                              "of logit post-processing (losses/model_logits.py) does not match this model")


def head_transform(model, where: str = "the chunked loss") -> LogitTransform:
    """The steps ``model``'s forward applies after ``h @ W.T``, for a path that has only the hidden states and the
    head's weight: ``ConfigError`` for an unknown model type or an LM head with a bias."""
    transform = require_logit_transform(model, where)
    head = base_model(model).get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ConfigError(f"{where}: model type {transform.model_type!r} has an LM head with a bias "
                          "(lm_head.bias); logits computed as hidden @ weight.T would leave it out")
    return transform


def forward_hidden(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Final (normed) hidden states ``[B, T, H]`` and the LM-head weight ``[V, H]``, without the ``[B, T, V]`` logits.

    The model's logits are ``head_transform(model)`` applied to ``hidden @ weight.T``; a model for which that is not
    known is refused (``ConfigError``), and the forward's own last-position logits are checked against it.
    """
    transform = head_transform(model)
    h, last = _decoder_run(model, batch)
    _check_last(model, transform, h, last)
    return h, base_model(model).get_output_embeddings().weight


def selected_logits(model, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, V]`` at the N trained positions only (``mask`` over positions 0..T-2), as the model's forward
    computes them: the LM head and the model's own post-processing (:mod:`.model_logits`) run on those positions
    only, never on prompt or padding. Same values as ``forward_logits(model, batch)[:, :-1][mask.bool()]``, which
    is what a model of unknown post-processing gets."""
    transform = logit_transform(model)
    if transform is None:
        return forward_logits(model, batch)[:, :-1][mask.bool()]
    h, last = _decoder_run(model, batch)
    _check_last(model, transform, h, last)
    return head_logits(model, h[:, :-1][mask.bool()], transform)


def shifted(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and mask aligned with logits positions 0..T-2 (position t predicts token t+1)."""
    return batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].float()
