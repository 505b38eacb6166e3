"""Divergences against a sparse teacher: its top-k log-probabilities plus one tail bucket.

A cached or served teacher gives, at each trained position, the ids ``S`` of its K most likely tokens, their
log-probabilities ``log p_S`` and the log of the mass left over, ``log p_rest = log(1 - sum_S p)``. Both
distributions are then compared on K + 1 bins: the K ids and "every other token".

    teacher bins:  p_bins = (p_{s_1}, ..., p_{s_K}, p_rest)
    student bins:  q_bins = (q_{s_1}, ..., q_{s_K}, q_rest),  q = softmax(z / T),  q_rest = sum_{v not in S} q_v
    L = mean over trained positions of D(p_bins, q_bins)

for every divergence ``D`` of :mod:`lmdistill.losses.divergences` (same formulas, same parameters). ``q_rest`` is a
log-sum-exp over the ids outside ``S`` (exact, no ``1 - sum`` cancellation). With K equal to the vocabulary the
tail is empty (``p_rest = q_rest = 0``) and the loss equals the dense loss (tested to 1e-6). With K < V, merging
the tail into one bin can only lower a divergence (data processing inequality); the gap at K = 64 is measured in
bench/README.md.

The teacher's distribution is the one it was scored with (its temperature is fixed at capture time), so the
student's temperature ``T`` must equal it; :class:`SparseTeacher` carries it and the loss checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmdistill.losses.divergences import (LOGPROB_FLOOR, check_divergence_params, check_temperature,
                                          divergence_from_logprobs, log_probs)
from lmdistill.losses.vocab import LossInputError


@dataclass
class SparseTeacher:
    """Top-k teacher log-probabilities at N positions (row-major over the trained positions of a batch).

    ``ids`` ``[N, K]`` (long), ``logprobs`` ``[N, K]``, ``rest`` ``[N]`` = log of the mass outside ``ids``
    (``-inf`` when there is none), ``temperature`` the temperature the teacher was scored at, ``vocab`` the size of
    the vocabulary its distribution is over (the student's logits are cut to it).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    rest: torch.Tensor
    temperature: float = 1.0
    vocab: int | None = None

    def __post_init__(self):
        if self.ids.shape != self.logprobs.shape or self.ids.dim() != 2 or self.rest.shape != self.ids.shape[:1]:
            raise LossInputError(f"sparse teacher: ids {tuple(self.ids.shape)}, logprobs {tuple(self.logprobs.shape)} "
                                 f"and rest {tuple(self.rest.shape)} must be [N, K], [N, K] and [N]")

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def rows(self, start: int, stop: int) -> "SparseTeacher":
        return SparseTeacher(self.ids[start:stop], self.logprobs[start:stop], self.rest[start:stop],
                             self.temperature, self.vocab)

    def index_select(self, index: torch.Tensor) -> "SparseTeacher":
        return SparseTeacher(self.ids.index_select(0, index), self.logprobs.index_select(0, index),
                             self.rest.index_select(0, index), self.temperature, self.vocab)

    def to(self, device) -> "SparseTeacher":
        return SparseTeacher(self.ids.to(device), self.logprobs.to(device), self.rest.to(device), self.temperature,
                             self.vocab)

    def bins(self, dtype: torch.dtype) -> torch.Tensor:
        """``[N, K + 1]`` floored log-probabilities of the teacher's bins."""
        lp = torch.cat([self.logprobs.to(dtype), self.rest.to(dtype)[:, None]], dim=-1)
        return torch.where(torch.isneginf(lp) | torch.isnan(lp), torch.full_like(lp, LOGPROB_FLOOR), lp)

    @staticmethod
    def concat(parts: list["SparseTeacher"]) -> "SparseTeacher":
        if not parts:
            raise LossInputError("sparse teacher: nothing to concatenate")
        first = parts[0]
        return SparseTeacher(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]),
                             torch.cat([p.rest for p in parts]), first.temperature, first.vocab)


def top_k_teacher(logits: torch.Tensor, k: int, temperature: float = 1.0) -> SparseTeacher:
    """The sparse form of dense teacher ``logits`` ``[N, V]``: top-``k`` of ``log_softmax(logits / T)`` and the tail.

    The tail is a log-sum-exp over the ids outside the top k (``-inf`` when ``k >= V``). Ties at the k-th value are
    broken by ``torch.topk``.
    """
    if logits.dim() != 2:
        raise LossInputError(f"top_k_teacher takes [N, V] logits, got {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    k = min(int(k), vocab)
    lp = torch.log_softmax(logits.float() / temperature, dim=-1) if logits.dtype != torch.float64 else \
        torch.log_softmax(logits / temperature, dim=-1)
    top, ids = lp.topk(k, dim=-1)
    if k < vocab:
        rest = lp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    else:
        rest = torch.full(lp.shape[:1], float("-inf"), dtype=lp.dtype, device=lp.device)
    return SparseTeacher(ids, top, rest, float(temperature), vocab)


def student_bins(student_logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[N, K + 1]`` floored log-probabilities of the student's bins: ``log q`` at ``ids`` and ``log q_rest``.

    ``q_rest`` is the log-sum-exp of ``log q`` with the ``ids`` entries set to the floor, so it stays finite (about
    ``LOGPROB_FLOOR``) when ``ids`` cover the vocabulary and its gradient never becomes NaN.
    """
    lq = log_probs(student_logits, temperature)
    picked = lq.gather(-1, ids)
    rest = lq.scatter(-1, ids, LOGPROB_FLOOR).logsumexp(-1, keepdim=True)
    bins = torch.cat([picked, rest], dim=-1)
    return bins.clamp(min=LOGPROB_FLOOR)


def sparse_per_token(name: str, student_logits: torch.Tensor, teacher: SparseTeacher, *, temperature: float = 1.0,
                     **params) -> torch.Tensor:
    """Divergence ``name`` between the bins of ``teacher`` and of ``student_logits`` ``[N, V]``, per position ``[N]``."""
    full = check_divergence_params(name, params)
    t = check_temperature(temperature)
    if abs(t - teacher.temperature) > 1e-12:
        raise LossInputError(f"the sparse teacher was scored at temperature {teacher.temperature}; the loss's "
                             f"temperature is {t} (capture again at this temperature, or set the term's "
                             f"temperature to {teacher.temperature})")
    if student_logits.dim() != 2 or student_logits.shape[0] != len(teacher):
        raise LossInputError(f"student logits {tuple(student_logits.shape)} do not match the sparse teacher's "
                             f"{len(teacher)} positions")
    if teacher.vocab is not None:
        if student_logits.shape[-1] < teacher.vocab:
            raise LossInputError(f"the student's vocabulary ({student_logits.shape[-1]}) is smaller than the "
                                 f"teacher's ({teacher.vocab})")
        student_logits = student_logits[:, :teacher.vocab]
    ids = teacher.ids.to(student_logits.device)
    logq = student_bins(student_logits, ids, t)
    logp = teacher.to(student_logits.device).bins(logq.dtype)
    return divergence_from_logprobs(name, logq, logp, **full)


def sparse_divergence(name: str, student_logits: torch.Tensor, teacher: SparseTeacher,
                      mask: torch.Tensor | None = None, *, temperature: float = 1.0, **params) -> torch.Tensor:
    """Token mean of :func:`sparse_per_token`.

    ``student_logits`` is ``[N, V]`` at the teacher's N positions, or ``[B, T, V]`` with a ``[B, T]`` ``mask`` whose
    ones (row-major) are the teacher's positions.
    """
    if mask is not None:
        student_logits = student_logits[mask.bool()]
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    return sparse_per_token(name, student_logits, teacher, temperature=temperature, **params).mean()


def sparse_value_and_grad(name: str, z: torch.Tensor, target: SparseTeacher, temperature: float, params: dict,
                          *, target_is_scratch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over rows of :func:`sparse_per_token` and its gradient w.r.t. the logits ``z`` ``[C, V]`` (the kernel the
    chunked path calls for a sparse teacher; a local autograd pass over one chunk)."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        value = sparse_per_token(name, zz, target, temperature=temperature, **params).sum()
        (grad,) = torch.autograd.grad(value, zz)
    return value.detach(), grad
