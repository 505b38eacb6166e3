"""Running a causal LM for a loss: logits at every position, at trained positions only, or hidden states.

Every forward takes position ids from the attention mask, so padding (left or right) never shifts them. The model
may be wrapped (DDP ``.module``, peft); gradients flow through the wrapper so they still synchronise.
"""

from __future__ import annotations

import torch


def unwrap(model):
    """The model inside a DDP/FSDP wrapper (``.module``), or the model itself."""
    return model.module if hasattr(model, "module") else model


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def forward_logits(model, batch: dict) -> torch.Tensor:
    """Logits ``[B, T, V]`` at every position of ``batch`` (``input_ids``, ``attention_mask``)."""
    attn = batch["attention_mask"]
    return model(input_ids=batch["input_ids"], attention_mask=attn, position_ids=positions(attn)).logits


def forward_hidden(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Final (normed) hidden states ``[B, T, H]`` and the LM-head weight ``[V, H]``, without the ``[B, T, V]`` logits.

    The model runs with ``logits_to_keep=1``; a forward hook on its decoder catches ``last_hidden_state``. Works for
    every HF causal LM with ``get_decoder()``.
    """
    inner = unwrap(model)
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    caught = {}

    def hook(_module, _inputs, output):
        caught["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = inner.get_decoder().register_forward_hook(hook)
    try:
        attn = batch["attention_mask"]
        model(input_ids=batch["input_ids"], attention_mask=attn, position_ids=positions(attn), logits_to_keep=1)
    finally:
        handle.remove()
    return caught["h"], inner.get_output_embeddings().weight


def selected_logits(model, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, V]`` at the N trained positions only (``mask`` over positions 0..T-2): the LM head never runs
    on prompt or padding positions. Same values as ``forward_logits(model, batch)[:, :-1][mask.bool()]``."""
    h, _ = forward_hidden(model, batch)
    return unwrap(model).get_output_embeddings()(h[:, :-1][mask.bool()])


def shifted(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and mask aligned with logits positions 0..T-2 (position t predicts token t+1)."""
    return batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].float()


def logit_postprocessing(model) -> bool:
    """True when the model changes its logits after the LM head (soft-capping, scaling): then only a full forward
    gives the right logits."""
    cfg = getattr(unwrap(model), "config", None)
    return bool(getattr(cfg, "final_logit_softcapping", None)) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0)
