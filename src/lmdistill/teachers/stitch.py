"""Splitting a batch's rows among teachers and putting their answers back in row order.

A batch of ``B`` rows is split into groups (the rows each teacher reads, in row order); each teacher answers for its
group; the answers are stitched back so the result is what one teacher answering for all rows would give:

- per-row outputs (``[b, T, ...]``: whole logits, hidden states, layer outputs) go back to their rows;
- per-position outputs (``[n, ...]`` over a group's positions in row-major order: logits at trained positions,
  top-k scores, token log-probabilities) go back to their positions: with ``c_i`` positions in row ``i`` and
  ``o_i = c_0 + ... + c_{i-1}``, row ``i``'s positions are ``o_i .. o_i + c_i - 1`` of the ``N = sum_i c_i``.
"""

from __future__ import annotations

import torch

from lmdistill.errors import ConfigError
from lmdistill.losses.sparse import SparseTeacher


def groups(routes: list[str], order: tuple[str, ...]) -> list[tuple[str, list[int]]]:
    """``[(name, row indices)]`` of the names in ``routes``, in ``order``, each group's rows in row order."""
    return [(name, [i for i, r in enumerate(routes) if r == name]) for name in order if name in routes]


def sub_batch(batch: dict, rows: list[int]) -> dict:
    """The ``rows`` of a batch: every tensor whose first dimension is the batch's rows, indexed; the rest as is."""
    n = batch["input_ids"].shape[0]
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n:
            v = v[torch.tensor(rows, dtype=torch.long, device=v.device)]
        out[k] = v
    return out


def position_index(counts: list[int], rows: list[int]) -> torch.Tensor:
    """Where the positions of ``rows`` sit (row-major) among all rows' positions, ``counts[i]`` per row."""
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + int(c))
    spans = [range(starts[r], starts[r] + int(counts[r])) for r in rows]
    return torch.tensor([p for s in spans for p in s], dtype=torch.long)


def stitch_rows(parts: list[tuple[list[int], torch.Tensor]], n_rows: int) -> torch.Tensor:
    """Per-row tensors ``[b, ...]`` of each group back into one ``[B, ...]`` (their dtype promoted)."""
    first = parts[0][1]
    dtype = first.dtype
    for _, t in parts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    out = torch.empty((n_rows, *first.shape[1:]), dtype=dtype, device=first.device)
    for rows, t in parts:
        out[torch.tensor(rows, dtype=torch.long, device=first.device)] = t.to(out.device, dtype)
    return out


def stitch_positions(parts: list[tuple[list[int], torch.Tensor]], counts: list[int]) -> torch.Tensor:
    """Per-position tensors ``[n, ...]`` of each group back into one ``[N, ...]`` in row-major order."""
    first = parts[0][1]
    dtype = first.dtype
    for _, t in parts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    out = torch.empty((sum(int(c) for c in counts), *first.shape[1:]), dtype=dtype, device=first.device)
    for rows, t in parts:
        index = position_index(counts, rows).to(first.device)
        if index.numel() != t.shape[0]:
            raise ConfigError(f"teachers: a teacher gave {t.shape[0]} positions for rows that train {index.numel()}")
        out[index] = t.to(out.device, dtype)
    return out


def stitch_sparse(parts: list[tuple[list[int], SparseTeacher]], counts: list[int]) -> SparseTeacher:
    """Top-k scores of each group back into one :class:`SparseTeacher` over all positions. The teachers must agree
    on ``k``, the temperature and the vocabulary (padding a smaller ``k`` would add empty bins, which changes the
    divergence; in training each micro-batch reads one teacher, so this never arises there)."""
    first = parts[0][1]
    for _, s in parts[1:]:
        if (s.k, s.temperature, s.vocab) != (first.k, first.temperature, first.vocab):
            raise ConfigError(f"teachers: top-k scores with k {first.k} and {s.k}, temperatures {first.temperature} "
                              f"and {s.temperature}, vocabularies {first.vocab} and {s.vocab} cannot be joined in one "
                              "batch")
    return SparseTeacher(stitch_positions([(r, s.ids) for r, s in parts], counts),
                         stitch_positions([(r, s.logprobs) for r, s in parts], counts),
                         stitch_positions([(r, s.rest) for r, s in parts], counts), first.temperature, first.vocab)


def shared(values: list, what: str):
    """The one value every teacher gives for ``what`` (a head weight, a transform, a layout); ``ConfigError`` when
    they differ (it cannot be split by rows)."""
    first = values[0]
    for v in values[1:]:
        if isinstance(v, torch.Tensor) or isinstance(first, torch.Tensor):
            same = v is first or (isinstance(v, torch.Tensor) and isinstance(first, torch.Tensor)
                                  and v.shape == first.shape and v.device == first.device and torch.equal(v, first))
        else:
            same = v == first
        if not same:
            raise ConfigError(f"teachers: {what} differs between the teachers, so rows of several teachers cannot "
                              "share one batch here")
    return first
