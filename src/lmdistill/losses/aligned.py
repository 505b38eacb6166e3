"""Distributions of two tokenizers compared on byte-aligned groups (ULD, GOLD): merging, sorted L1, the hybrid.

The student and a teacher with another tokenizer read the same response text, each in its own tokens. The teacher
side (``teachers/cross_tokenizer.py``) cuts both token sequences into *groups* at the byte offsets where both sides
end a token (TRL GOLD's extended ULD, trl 1.16.0 ``trl/experimental/gold/gold_trainer.py:530``
``_align_by_byte_offsets``; the line numbers below are that file's): group
``g`` holds the student's trained positions ``[s0, s1)`` and the teacher's scored positions ``[t0, t1)``, both
covering the same bytes. Position ``k`` of either side is the distribution ``P_k`` over that side's vocabulary of the
token at ``k`` given the text before it (the logits one position earlier: the causal shift).

Merge (one vector per group and side, ``merge:``), with ``a_k = log P_k(x_k)`` the log-probability of the side's own
token at ``k``:

- ``observed`` (TRL's default): ``log v_g = log P_{s0} + sum_{k in (s0, s1)} a_k``: the distribution at the group's
  first position (which both sides compute from the same text: the group starts at a shared boundary) times the
  probabilities of the later actual tokens;
- ``bayesian``: ``log v_g = log P_{s1-1} + sum_{k in [s0, s1-1)} a_k``: the last position's distribution times the
  probabilities of the earlier actual tokens, i.e. the joint probability of the group's earlier tokens followed by
  each token of the vocabulary (chain rule).

One-token groups are the distribution itself under both rules. Merging works in log space (no clamp: TRL clamps each
factor at 1e-8, ``gold_trainer.py:611``).

Distances per group (``p`` the teacher's vector, ``q`` the student's, ``sort`` descending, zero padding to the larger
vocabulary written out as the sum of the longer side's tail):

- sorted L1 (ULD, Boizard et al. 2024, arXiv:2402.12030, eq. 4; ``gold_trainer.py:505-523``):
  ``L1_g = sum_i |sort(q)_i - sort(p)_i|``;
- with a sparse teacher (its top K and the remaining mass ``r``): the K listed entries are the K largest, so
  ``L1_g ~= sum_{i<=K} |sort(q)_i - sort(p)_i| + |sum_{i>K} sort(q)_i - r|``, the least sorted L1 of any
  teacher vector with those top K and tail mass (equal to the dense L1 when K covers the vocabulary or the tail lies
  under the student's tail entry by entry);
- hybrid (GOLD, ``gold_trainer.py:625-722``): token ids whose text is the same in both vocabularies (``matched``
  pairs) get the generalized JSD with ``beta`` on those entries, the rest the sorted L1 above;
  ``D_g = w_m JSD_beta(p_M || q_M) + w_u L1(p_rest, q_rest)`` with ``w_m = |M| / V_teacher``, ``w_u = 1 - w_m``
  (TRL's adaptive weights) unless both weights are given.

The vocabularies are each tokenizer's ids (a head's padding rows are cut off, as the same-tokenizer terms do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lmdistill.losses.divergences import jsd_from_logprobs
from lmdistill.losses.sparse import SparseTeacher
from lmdistill.losses.vocab import LossInputError

MERGES = ("observed", "bayesian")


@dataclass
class AlignedTeacher:
    """A teacher's view of one micro-batch in its own tokens, aligned to the student's by bytes.

    ``groups`` ``[G, 4]`` long: student start and stop (flat indices over the student's trained positions,
    row-major, as the terms' ``[N, V]`` logits) and teacher start and stop (flat over ``teacher_ids``);
    ``teacher_ids`` ``[M]`` the teacher's tokens; ``logits`` ``[M, V_t]`` its logits predicting them (a model here)
    or ``sparse`` its top-k there (a server, a cache) with ``token_logprobs`` ``[M]`` (log-probability of its own
    token, at the sparse teacher's temperature); ``matching`` makes ``matched``, ``(teacher ids, student ids)`` of
    the tokens whose text is the same in both vocabularies; ``vocab`` ``(student, teacher)`` vocabulary sizes;
    ``coverage`` the share of response bytes in one-to-one groups.
    """

    groups: torch.Tensor
    teacher_ids: torch.Tensor
    logits: torch.Tensor | None = None
    sparse: SparseTeacher | None = None
    token_logprobs: torch.Tensor | None = None
    matching: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    vocab: tuple[int, int] = (0, 0)
    coverage: float = 1.0
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.groups.dim() != 2 or self.groups.shape[-1] != 4:
            raise LossInputError(f"aligned teacher: groups must be [G, 4], got {tuple(self.groups.shape)}")
        if (self.logits is None) == (self.sparse is None):
            raise LossInputError("aligned teacher: give exactly one of logits (dense) and sparse (top-k)")
        if self.sparse is not None and self.token_logprobs is None:
            raise LossInputError("aligned teacher: a sparse teacher needs token_logprobs (its own tokens' scores)")

    @property
    def matched(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(teacher ids, student ids)`` of the tokens whose text is the same in both vocabularies (made on first
        use: a few seconds for a 262k vocabulary, which only ``gold`` reads)."""
        return self.matching() if self.matching is not None else None


def check_merge(merge: str) -> str:
    if merge not in MERGES:
        raise LossInputError(f"merge: must be one of {', '.join(MERGES)}, got {merge!r}")
    return merge


def _base_and_scalars(start: torch.Tensor, stop: torch.Tensor, own: torch.Tensor, merge: str):
    """The base position of each group and ``sum`` of the own-token log-probabilities of its other positions."""
    base = start if merge == "observed" else stop - 1
    sizes = stop - start
    group = torch.repeat_interleave(torch.arange(len(start), device=start.device), sizes)
    offsets = torch.arange(int(sizes.sum()), device=start.device) - torch.repeat_interleave(
        torch.cumsum(sizes, 0) - sizes, sizes)
    pos = start[group] + offsets
    take = torch.where(pos == base[group], torch.zeros_like(own[pos]), own[pos])
    scalars = torch.zeros(len(start), dtype=own.dtype, device=own.device).index_add(0, group, take)
    return base, scalars


def merge_logprobs(logprobs: torch.Tensor, own: torch.Tensor, start: torch.Tensor, stop: torch.Tensor,
                   merge: str = "observed") -> torch.Tensor:
    """``[G, V]`` log of each group's merged vector from per-position ``logprobs`` ``[P, V]`` and ``own`` ``[P]``."""
    check_merge(merge)
    base, scalars = _base_and_scalars(start, stop, own, merge)
    return logprobs[base] + scalars[:, None]


def merge_sparse(sparse: SparseTeacher, own: torch.Tensor, start: torch.Tensor, stop: torch.Tensor,
                 merge: str = "observed") -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse teacher's merged groups: log of the K listed entries ``[G, K]`` and of the tail mass ``[G]``."""
    check_merge(merge)
    base, scalars = _base_and_scalars(start, stop, own, merge)
    return sparse.logprobs[base] + scalars[:, None], sparse.rest[base] + scalars


def descending(x: torch.Tensor) -> torch.Tensor:
    """``x`` sorted descending along its last dimension. A tensor without gradients on the CPU (the teacher's side)
    is sorted by NumPy: its vectorised sort (AVX-512 where the CPU has it) took 0.27 s where ``torch.sort`` took 1.8 s
    for 100 rows of 262,144 entries, and 0.012 s vs 0.30 s at 49,152, on the benchmark machine, where the teacher's
    sorts were the largest part of the term (bench/README.md, "Cross-tokenizer step"); values alone need no order of
    equal entries. With gradients, or elsewhere, ``torch.sort`` (its order of equal entries picks the subgradient)."""
    if x.requires_grad or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return x.sort(dim=-1, descending=True).values
    return torch.from_numpy(np.sort(x.detach().numpy(), axis=-1)[..., ::-1].copy())   # a copy: positive strides


def sorted_l1(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``[G]`` L1 distance between ``q`` ``[G, Vq]`` and ``p`` ``[G, Vp]`` each sorted descending, the shorter
    zero-padded (its missing entries are 0, so the longer side's tail counts in full)."""
    a, b = descending(q), descending(p)
    n = min(a.shape[-1], b.shape[-1])
    return (a[:, :n] - b[:, :n]).abs().sum(-1) + a[:, n:].sum(-1) + b[:, n:].sum(-1)


def sorted_l1_sparse(q: torch.Tensor, top: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """``[G]`` sorted L1 between ``q`` ``[G, V]`` and a teacher known by its top entries ``top`` ``[G, K]`` (any
    order) and the mass ``rest`` ``[G]`` of the others: the listed part entry by entry, the tails as one mass each."""
    k = top.shape[-1]
    b = top.sort(dim=-1, descending=True).values
    if k >= q.shape[-1]:
        a = q.sort(dim=-1, descending=True).values
        n = a.shape[-1]
        return (a - b[:, :n]).abs().sum(-1) + b[:, n:].sum(-1) + rest
    head = q.topk(k, dim=-1).values
    tail = (q.sum(-1) - head.sum(-1)).clamp(min=0)
    return (head - b).abs().sum(-1) + (tail - rest).abs()


def hybrid(logq: torch.Tensor, logp: torch.Tensor, matched: tuple[torch.Tensor, torch.Tensor], *, beta: float,
           matched_weight: float | None = None, unmatched_weight: float | None = None) -> torch.Tensor:
    """``[G]`` GOLD's hybrid of merged log-vectors ``logq`` ``[G, Vs]`` (student) and ``logp`` ``[G, Vt]``
    (teacher): generalized JSD on the ``matched`` ids, sorted L1 on the rest (module docstring)."""
    t_ids, s_ids = (m.to(logq.device) for m in matched)
    vs, vt = logq.shape[-1], logp.shape[-1]
    inside = (t_ids < vt) & (s_ids < vs)   # ids of a tokenizer longer than its model's head are left out
    t_ids, s_ids = t_ids[inside], s_ids[inside]
    jsd = jsd_from_logprobs(logq[:, s_ids], logp[:, t_ids], beta) if len(t_ids) else logq.new_zeros(len(logq))
    s_rest = torch.ones(vs, dtype=torch.bool, device=logq.device)
    s_rest[s_ids] = False
    t_rest = torch.ones(vt, dtype=torch.bool, device=logq.device)
    t_rest[t_ids] = False
    if bool(s_rest.any()) and bool(t_rest.any()):
        l1 = sorted_l1(logq[:, s_rest].exp(), logp[:, t_rest].exp())
    else:
        l1 = logq.new_zeros(len(logq))
    if matched_weight is None:
        matched_weight = len(t_ids) / max(1, vt)
        unmatched_weight = 1.0 - matched_weight
    return matched_weight * jsd + unmatched_weight * l1


def group_positions(groups: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four columns of ``groups`` (student start, stop, teacher start, stop)."""
    return tuple(groups[:, i] for i in range(4))
