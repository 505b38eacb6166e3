"""Deterministic data order: the examples of optimiser step ``s`` depend only on (seed, s).

Each epoch is a permutation drawn from ``seed + epoch``; global position ``i = s * batch_size + j``.
Nothing but the step number needs saving to resume exactly, and every world size sees the same
global batch (rank r takes rows r, r + world, ...).
"""

from __future__ import annotations

import torch


def global_batch_indices(step: int, batch_size: int, n_examples: int, seed: int) -> list[int]:
    out, cache = [], {}
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n_examples)
        if epoch not in cache:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(n_examples, generator=g).tolist()
        out.append(cache[epoch][pos])
    return out


def rank_slice(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def step_seed(seed: int, step: int, *parts: int) -> int:
    """A 63-bit seed derived from (seed, step, parts): every random draw of a step comes from here."""
    h = (seed * 0x9E3779B1 + step * 0x85EBCA77) & (2**63 - 1)
    for p in parts:
        h = (h * 0xC2B2AE3D + p + 1) & (2**63 - 1)
    return h
