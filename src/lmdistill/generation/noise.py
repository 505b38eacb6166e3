"""Per-row sampling noise: a pure function of (row key, stream, step).

Every sequence in a batch has its own key. The uniforms for row ``b`` at response step ``t`` come
from a ``torch.Generator`` seeded with ``mix(key_b, stream, t)``, so

- a row's tokens do not depend on which other rows share its batch or on the batch size,
- two policies that sample step ``t`` of the same row with the same key see the same noise
  (``switch`` with tau0=inf then reproduces ``student`` token for token),
- a resumed run reproduces an uninterrupted one exactly, and any step can be re-drawn directly
  (SCRG's re-generation starts mid-sequence).

Sampling is Gumbel-max: ``argmax(logits / T + g)`` with ``g = -log(-log(u))`` is an exact sample
from ``softmax(logits / T)``. Cost per step: one reseed and one ``rand`` per row.
"""

from __future__ import annotations

import hashlib

import torch

_M64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64's finaliser: a well-mixed 64-bit integer from any 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def step_seed(key: int, stream: int, step: int) -> int:
    """The generator seed of one row at one step of one stream (63 bits, a valid torch seed)."""
    return mix64(mix64(mix64(key & _M64) ^ (stream & _M64)) ^ (step & _M64)) >> 1


def key_from(*parts) -> int:
    """A 64-bit key from any printable parts, e.g. ``key_from(seed, example_id)``."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def keys_from_seed(batch: int, seed: int | None) -> list[int]:
    """Per-row keys drawn from a ``torch.Generator`` seeded with ``seed`` (fresh randomness when None)."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return [int(k) for k in torch.randint(0, 2**62, (batch,), generator=gen, dtype=torch.int64)]


class NoiseSource:
    """Uniform / Gumbel noise for a batch of rows with fixed keys, over the first ``vocab`` ids."""

    def __init__(self, keys: list[int], vocab: int, device: torch.device | str = "cpu"):
        self.keys = [int(k) for k in keys]
        self.vocab = vocab
        self.device = torch.device(device)
        self._gen = torch.Generator(device=self.device)

    def select(self, rows) -> "NoiseSource":
        """The noise of a subset of rows (same keys, so the same values)."""
        return NoiseSource([self.keys[int(r)] for r in rows], self.vocab, self.device)

    def uniform(self, step: int, stream: int = 0, rows: int | None = None) -> torch.Tensor:
        """``[B, vocab]`` uniforms in [0, 1) for response step ``step`` of ``stream`` (``rows``: the first rows only)."""
        keys = self.keys if rows is None else self.keys[:rows]
        out = torch.empty((len(keys), self.vocab), dtype=torch.float32, device=self.device)
        for b, key in enumerate(keys):
            self._gen.manual_seed(step_seed(key, stream, step))
            out[b].uniform_(generator=self._gen)
        return out

    def gumbel(self, step: int, stream: int = 0, rows: int | None = None) -> torch.Tensor:
        """Gumbel(0, 1) noise; u = 0 maps to -inf (that id is never picked)."""
        return self.uniform(step, stream, rows).log_().neg_().log_().neg_()  # -log(-log(u)), in place
