"""Masks: validation and selection of the trained positions.

A mask is aligned with the logits positions: ``mask[b, t] = 1`` when position t's logits are
trained.  Selecting the trained positions *before* computing a divergence (instead of multiplying
by the mask afterwards) keeps padding from ever changing the value or the gradient, even when the
padded positions hold garbage such as NaN or infinite logits.
"""

from __future__ import annotations

import torch

from lmdistill.losses.vocab import LossInputError


def as_bool_mask(mask: torch.Tensor | None, leading_shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """Check that ``mask`` has ``leading_shape`` and holds only 0/1; return it as bool (None stays None)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    if tuple(mask.shape) != tuple(leading_shape):
        raise LossInputError(f"mask shape {tuple(mask.shape)} does not match the logits positions "
                             f"{tuple(leading_shape)} (the mask is aligned with logits, callers shift)")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise LossInputError("mask must hold only 0 and 1")
        mask = mask != 0
    return mask.to(device)


def graph_zero(x: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that is part of ``x``'s graph (so ``.backward()`` works), even if ``x`` holds inf or NaN."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.reshape(-1)[:0].sum().to(dtype)


def select(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` ([..., V]) at the trained positions, flattened to ``[N, V]``."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    return x[mask]
