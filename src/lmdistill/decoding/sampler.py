"""How a request's next token is chosen: the argmax at temperature 0, else a draw from the nucleus of
``softmax(logits / T)`` with the request's own generator.

The nucleus is the sequence engine's rule (``generation.sampling.filter_logits``: the smallest set of most
likely tokens whose probability reaches ``top_p``). Every request owns its ``torch.Generator``, seeded from its
``seed`` (or from torch's entropy when none is given), so a seeded request draws the same tokens whether it
decodes alone or in a batch: both token sources (``decoder.solo_steps``, ``batcher.Batcher``) call ``pick``.
"""

from __future__ import annotations

import torch

from lmdistill.generation.sampling import filter_logits


def request_generator(device: torch.device, temperature: float, seed: int | None) -> torch.Generator | None:
    """A request's own random generator on ``device`` (``None`` for greedy): seeded, it draws the same alone or
    batched."""
    if temperature <= 0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) if seed is not None else torch.seed())
    return gen


def pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """The next token from one step's ``[V]`` float logits under the request's settings."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    scaled = logits / temperature
    if not torch.isfinite(scaled.max()):   # a temperature so small (1e-40) that logits / T overflows: its limit
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(scaled, top_p=top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))
