"""Turn next-token logits into tokens: temperature, top-k, top-p, greedy, Gumbel-max with given noise."""

from __future__ import annotations

import torch

from lmdistill.generation.config import SamplingConfig


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set every id outside the top-k, then outside the top-p nucleus, to -inf (last dim = vocab).

    The nucleus is the smallest set of most probable ids whose mass reaches ``top_p``; the most
    probable id is always kept.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def scaled_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Logits (float32) divided by the temperature and filtered; the distribution tokens are drawn from."""
    x = logits.float()
    if config.temperature != 1.0:
        x = x / config.temperature
    return filter_logits(x, config.top_k, config.top_p)


def pick(logits: torch.Tensor, config: SamplingConfig, gumbel: torch.Tensor | None, *,
         scaled: bool = False) -> torch.Tensor:
    """One token per row from ``[B, V]`` logits: argmax when greedy, else Gumbel-max with ``gumbel`` ``[B, V]``.

    ``scaled=True``: the logits are already divided by the temperature (top-k / top-p still apply).
    """
    if config.greedy:
        return logits.argmax(-1)
    x = filter_logits(logits.float(), config.top_k, config.top_p) if scaled else scaled_logits(logits, config)
    return (x + gumbel.to(logits.device)).argmax(-1)
