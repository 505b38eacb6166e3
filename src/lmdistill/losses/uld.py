"""The cross-tokenizer terms ``uld`` and ``gold``: the student against a teacher that reads the same text in its own
tokens, compared on byte-aligned groups (the math: :mod:`lmdistill.losses.aligned`).

- ``uld`` (Universal Logit Distillation, Boizard et al. 2024, arXiv:2402.12030; TRL GOLD's ``use_uld_loss`` with
  ``use_extended_uld``): ``L1_g = sum_i |sort(q_g)_i - sort(p_g)_i|`` on each group's merged vectors;
- ``gold`` (TRL GOLD's ``uld_use_hybrid_loss``): tokens whose text is the same in both vocabularies get the
  generalized JSD (``beta``), the rest the sorted L1, weighted by the matched share of the teacher's vocabulary
  (or ``matched_weight`` / ``unmatched_weight``).

``q`` and ``p`` are ``softmax(logits / temperature)`` of each side, merged within each group by ``merge``
(``observed``, TRL's default, or ``bayesian``). The term is ``sum_g D_g / N``: each group's distance is charged to
the student token that closes it and the mean runs over the N student tokens of the sequences (the trainer's
``sequences`` token set), so micro-batches and processes add up exactly as for every other term. With one tokenizer
every group is one token and ``N`` equals the number of groups: ``uld`` is then the mean sorted L1 and ``gold`` the
mean generalized JSD of the same-tokenizer ``jsd`` term. TRL averages over each row's groups, then over rows.

Each forward also records the micro-batch's alignment coverage, the share of its response bytes that lie in
one-to-one groups (``AlignedTeacher.coverage``), in ``last_stats``: metrics.jsonl and TensorBoard show it per step as
``uld/coverage`` (``gold/coverage``; the entry's name), the micro-batches weighted by their student tokens.
"""

from __future__ import annotations

import math

import torch

from lmdistill.errors import ConfigError
from lmdistill.losses.aligned import (MERGES, AlignedTeacher, group_positions, hybrid, merge_logprobs, merge_sparse,
                                      sorted_l1, sorted_l1_sparse)
from lmdistill.losses.divergences import check_temperature, log_probs
from lmdistill.losses.term import Term, TermInputs
from lmdistill.losses.vocab import LossInputError


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class AlignedTerm(Term):
    """What ``uld`` and ``gold`` share: the teacher they read (aligned by bytes), the merge, the temperature."""

    needs_teacher = True
    #: teacher capabilities that will do: full distributions of its own tokens, or (``uld``) their top-k
    aligned_capabilities: tuple[str, ...] = ("aligned",)

    def __init__(self, *, temperature: float = 1.0, merge: str = "observed"):
        super().__init__()
        self.temperature, self.merge = float(temperature), merge

    @classmethod
    def teacher_needs(cls, params: dict) -> tuple[tuple[str, ...], float | None]:
        return cls.aligned_capabilities, float(params.get("temperature", 1.0))

    @classmethod
    def check_params(cls, params: dict, where: str) -> None:
        super().check_params(params, where)
        try:
            check_temperature(params.get("temperature", 1.0))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        if params.get("merge", "observed") not in MERGES:
            raise ConfigError(f"{where}: merge must be one of {', '.join(MERGES)}, got {params['merge']!r}")

    def student_side(self, inputs: TermInputs, al: AlignedTeacher) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's log-probabilities ``[N, V_s]`` at its trained positions and of its own tokens ``[N]``."""
        targets, mask = inputs.targets
        logits = inputs.student_logits
        if inputs.whole:
            logits = logits[mask.bool()]
        ids = targets[mask.bool()]
        vocab = al.vocab[0] or logits.shape[-1]
        if logits.shape[-1] < vocab:
            raise LossInputError(f"the student's logits have {logits.shape[-1]} entries, its tokenizer {vocab} ids")
        lp = log_probs(logits[:, :vocab], self.temperature)
        return lp, lp.gather(-1, ids[:, None].to(lp.device)).squeeze(-1)

    def teacher_dense(self, al: AlignedTeacher, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's log-probabilities ``[M, V_t]`` (on ``like``'s device and dtype) and of its own tokens."""
        vocab = al.vocab[1] or al.logits.shape[-1]
        lp = log_probs(al.logits[:, :vocab].to(device=like.device, dtype=like.dtype), self.temperature)
        return lp, lp.gather(-1, al.teacher_ids[:, None].to(lp.device)).squeeze(-1)

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        al = inputs.teacher_aligned
        self.last_stats = {"coverage": al.coverage}   # logged as ENTRY/coverage (share of bytes in 1:1 groups)
        lq, own_q = self.student_side(inputs, al)
        if len(al.groups) == 0:
            return lq.sum() * 0.0
        s0, s1, t0, t1 = (c.to(lq.device) for c in group_positions(al.groups))
        merged_q = merge_logprobs(lq, own_q, s0, s1, self.merge)
        per_group = self.distance(merged_q, al, t0, t1)
        return per_group.sum() / max(lq.shape[0], 1)

    def distance(self, merged_q, al: AlignedTeacher, t0, t1) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, merge={self.merge}"


class ULDTerm(AlignedTerm):
    """Universal Logit Distillation on byte-aligned groups: the sorted-probability L1 per group (module docstring).
    Works from the teacher's full distributions or from its top-k and tail mass (a server, a cache)."""

    aligned_capabilities = ("aligned", "aligned_top_k")

    def distance(self, merged_q, al: AlignedTeacher, t0, t1) -> torch.Tensor:
        if al.sparse is None:
            lp, own_p = self.teacher_dense(al, merged_q)
            return sorted_l1(merged_q.exp(), merge_logprobs(lp, own_p, t0, t1, self.merge).exp())
        if abs(al.sparse.temperature - self.temperature) > 1e-12:
            raise LossInputError(f"the teacher was scored at temperature {al.sparse.temperature}; the term's "
                                 f"temperature is {self.temperature}")
        sparse = al.sparse.to(merged_q.device)
        top, rest = merge_sparse(sparse, al.token_logprobs.to(merged_q.device), t0, t1, self.merge)
        return sorted_l1_sparse(merged_q.exp(), top.to(merged_q.dtype).exp(), rest.to(merged_q.dtype).exp())


class GOLDTerm(AlignedTerm):
    """GOLD's hybrid: generalized JSD (``beta``) on the tokens both vocabularies spell the same, sorted L1 on the
    rest (module docstring); needs the teacher's full distributions."""

    def __init__(self, *, temperature: float = 1.0, merge: str = "observed", beta: float = 0.5,
                 matched_weight: float | None = None, unmatched_weight: float | None = None):
        super().__init__(temperature=temperature, merge=merge)
        self.beta, self.matched_weight, self.unmatched_weight = float(beta), matched_weight, unmatched_weight

    @classmethod
    def check_params(cls, params: dict, where: str) -> None:
        super().check_params(params, where)
        beta = params.get("beta", 0.5)
        if not (_number(beta) and 0.0 <= beta <= 1.0):
            raise ConfigError(f"{where}: beta must be a number in [0, 1], got {beta!r}")
        weights = [params.get("matched_weight"), params.get("unmatched_weight")]
        if (weights[0] is None) != (weights[1] is None):
            raise ConfigError(f"{where}: matched_weight and unmatched_weight are set together (both numbers), or "
                              "neither (the matched share of the teacher's vocabulary, as TRL)")
        if weights[0] is not None and not all(_number(w) and w >= 0 for w in weights):
            raise ConfigError(f"{where}: matched_weight and unmatched_weight must be numbers >= 0, got {weights}")

    def distance(self, merged_q, al: AlignedTeacher, t0, t1) -> torch.Tensor:
        if al.matched is None:
            raise LossInputError("gold: the aligned teacher gave no vocabulary matches")
        lp, own_p = self.teacher_dense(al, merged_q)
        merged_p = merge_logprobs(lp, own_p, t0, t1, self.merge)
        return hybrid(merged_q, merged_p, al.matched, beta=self.beta, matched_weight=self.matched_weight,
                      unmatched_weight=self.unmatched_weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}"
