"""DAC-KL: distribution adaptive clipping KL (MGSR, arXiv 2407.10068, Sec. 4.2) - a reconstruction.

What the paper says: a small learnable sub-network ``f_sub`` predicts a lower and an upper quantile
bound (l, u) of the teacher's output distribution for every token; the teacher's "semantically
dense" classes inside the bounds plus the target class (the teacher's most probable class) form a
new, smaller probability vector; the KL divergence is taken between the teacher's and the
student's vectors built on the same classes; ``f_sub`` is trained end to end with the student.
Appendix D.1 compares it with fixed bounds.  The paper leaves out the sub-network's input and
size, whether the new vector is renormalised and how the clipper is kept from collapsing.

What we chose (see docs/METHODS.md), all configurable:

* ``f_sub`` input: the teacher's top-K sorted probabilities (``top_k=256``) and the entropy of the
  full teacher distribution; an MLP ``Linear(K+1, hidden) -> GELU -> Linear(hidden, 2)`` gives
  ``(a, b)`` and ``u = sigmoid(b)``, ``l = u * sigmoid(a)``, so ``0 <= l < u <= 1``.  The bounds are
  quantiles of cumulative teacher mass in sorted order.
* Class k of the sorted top-K occupies the interval ``[c_{k-1}, c_k]`` of cumulative mass
  (``c_k = p_(1) + ... + p_(k)``).  It is kept when that interval overlaps ``[l, u]``
  (``c_{k-1} < u`` and ``c_k > l``); the teacher's argmax is always kept.  Classes outside the
  top-K are never kept.
* Every class that is not kept is lumped into one "rest" bin, for the teacher and the student
  alike, so both vectors are proper distributions over (kept classes + rest), and the loss is
  ``KL(p~ || q~) = sum_{k kept} p_k log(p_k / q_k) + p_rest log(p_rest / q_rest)``.
  Ablation ``rest_bin=False``: the kept entries are renormalised instead,
  ``KL(p^ || q^)`` with ``p^ = p_kept / sum p_kept`` and likewise for q.
* Membership is hard in the forward pass; gradients reach ``f_sub`` through a straight-through
  soft membership ``sigmoid(s (u - c_{k-1})) * sigmoid(s (c_k - l))`` (sharpness ``s=50``).
* Coverage term: ``coverage_weight * relu(coverage_floor - sum_{k kept} p_k)`` (floor 0.8, weight 5:
  with weight 1 the KL's pull still closed the bounds in tests), so the
  clipper cannot shrink to the argmax alone (coarser vectors always have a smaller KL, so the KL
  alone drives the bounds together).  Its gradient w.r.t. the bounds is taken through the interval
  width ``u - l`` (straight-through; the retained mass is always >= the width): through the
  sigmoid memberships it would vanish once the bounds have closed in on the argmax, and in tests
  the clipper then collapsed for good within ten Adam steps.
* Ablation ``fixed_bounds=(l, u)``: no sub-network, constant bounds (Appendix D.1).

The module's parameters are ordinary ``nn.Parameter`` s: add ``DACKL.parameters()`` to the
student's optimiser and save its ``state_dict`` with the checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmdistill.errors import ConfigError
from lmdistill.losses.divergences import LOGPROB_FLOOR, check_temperature, log_probs
from lmdistill.losses.masking import as_bool_mask, graph_zero, select
from lmdistill.losses.term import Term, TermInputs
from lmdistill.losses.vocab import align_vocab

_EPS = 1e-30


def _mass_outside(logprobs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Probability mass of the classes not in ``idx`` (per row), from log-probabilities."""
    rest = logprobs.scatter(-1, idx, LOGPROB_FLOOR)  # exp(LOGPROB_FLOOR) == 0: finite values and grads
    return torch.logsumexp(rest, dim=-1).exp()


class DACKL(nn.Module):
    """Distribution adaptive clipping KL with a learnable quantile sub-network.

    Loss (mean over trained tokens)::

        KL(p~ || q~) + coverage_weight * relu(coverage_floor - sum_{k kept} p_k)

    where p~, q~ are the teacher / student distributions over the kept classes plus one rest bin.

    Args:
        top_k: number of sorted teacher probabilities fed to ``f_sub`` (and candidate classes).
        hidden_size: width of ``f_sub``'s hidden layer.
        coverage_floor: teacher mass the kept set should retain (0 disables the term).
        coverage_weight: weight of the coverage term.
        sharpness: slope of the sigmoid relaxation of membership (gradients only).
        fixed_bounds: ``(l, u)`` with ``0 <= l < u <= 1`` to use constant bounds (ablation).
        rest_bin: ``False`` renormalises the kept classes instead of adding a rest bin (ablation).
        temperature: both distributions are softmax(logits / T).
        init_bounds: initial ``(l, u)`` that ``f_sub``'s output bias starts from.
    """

    def __init__(self, top_k: int = 256, hidden_size: int = 64, *, coverage_floor: float = 0.8,
                 coverage_weight: float = 5.0, sharpness: float = 50.0,
                 fixed_bounds: tuple[float, float] | None = None, rest_bin: bool = True,
                 temperature: float = 1.0, init_bounds: tuple[float, float] = (0.02, 0.95)):
        super().__init__()
        if not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"DACKL top_k must be a positive integer, got {top_k!r}")
        if not 0.0 <= coverage_floor <= 1.0:
            raise ConfigError(f"DACKL coverage_floor must be in [0, 1], got {coverage_floor}")
        if not (math.isfinite(coverage_weight) and coverage_weight >= 0 and math.isfinite(sharpness) and sharpness > 0):
            raise ConfigError(f"DACKL coverage_weight must be a finite number >= 0 and sharpness a finite number > 0, "
                              f"got {coverage_weight!r} and {sharpness!r}")
        for name, bounds in (("fixed_bounds", fixed_bounds), ("init_bounds", init_bounds)):
            if bounds is not None:
                lo, hi = bounds
                if not 0.0 <= lo < hi <= 1.0:
                    raise ConfigError(f"DACKL {name} must satisfy 0 <= l < u <= 1, got {bounds}")
        self.top_k = top_k
        self.coverage_floor = float(coverage_floor)
        self.coverage_weight = float(coverage_weight)
        self.sharpness = float(sharpness)
        self.fixed_bounds = None if fixed_bounds is None else (float(fixed_bounds[0]), float(fixed_bounds[1]))
        self.rest_bin = bool(rest_bin)
        self.temperature = check_temperature(temperature)
        self.last_stats: dict[str, float] = {}
        if self.fixed_bounds is None:
            self.f_sub = nn.Sequential(nn.Linear(top_k + 1, hidden_size), nn.GELU(), nn.Linear(hidden_size, 2))
            lo, hi = init_bounds
            with torch.no_grad():
                self.f_sub[2].weight.mul_(0.01)
                # u = sigmoid(b), l = u * sigmoid(a)
                self.f_sub[2].bias.copy_(torch.tensor([torch.logit(torch.tensor(lo / hi)).item(),
                                                       torch.logit(torch.tensor(hi)).item()]))
        else:
            self.f_sub = None

    def bounds(self, sorted_probs: torch.Tensor, entropy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper cumulative-mass bounds ``[N]`` from sorted teacher probs ``[N, K]`` and entropy ``[N]``."""
        n = sorted_probs.shape[0]
        if self.f_sub is None:
            lo, hi = self.fixed_bounds
            return (sorted_probs.new_full((n,), lo), sorted_probs.new_full((n,), hi))
        feats = sorted_probs
        if feats.shape[1] < self.top_k:  # tiny vocabularies: pad the feature vector with zeros
            feats = F.pad(feats, (0, self.top_k - feats.shape[1]))
        w = self.f_sub[0].weight
        out = self.f_sub(torch.cat([feats, entropy[:, None]], dim=1).to(w.dtype)).to(sorted_probs.dtype)
        upper = torch.sigmoid(out[:, 1])
        lower = upper * torch.sigmoid(out[:, 0])
        return lower, upper

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        student_logits, teacher_logits = align_vocab(student_logits, teacher_logits)
        bmask = as_bool_mask(mask, student_logits.shape[:-1], student_logits.device)
        s = select(student_logits, bmask)
        t = select(teacher_logits, bmask).detach()
        if s.shape[0] == 0:
            return graph_zero(student_logits) + sum(graph_zero(p) for p in self.parameters())
        logq = log_probs(s, self.temperature)
        logp = log_probs(t, self.temperature)
        k = min(self.top_k, logp.shape[-1])
        top_logp, idx = logp.topk(k, dim=-1)  # sorted, descending
        top_p = top_logp.exp()
        entropy = -(logp.exp() * logp).sum(-1)
        lower, upper = self.bounds(top_p, entropy)

        cum = top_p.cumsum(-1)
        start = cum - top_p
        hard = ((start < upper[:, None]) & (cum > lower[:, None])).to(top_p.dtype)
        soft = torch.sigmoid(self.sharpness * (upper[:, None] - start)) * \
            torch.sigmoid(self.sharpness * (cum - lower[:, None]))
        always = torch.zeros_like(hard, dtype=torch.bool)
        always[:, 0] = True  # the teacher's argmax (the target class) is always kept
        hard = hard.masked_fill(always, 1.0)
        soft = soft.masked_fill(always, 1.0)
        member = hard + (soft - soft.detach())  # straight-through: hard values, soft gradients

        top_logq = logq.gather(-1, idx)
        top_q = top_logq.exp()
        p_kept = (member * top_p).sum(-1)
        q_kept = (member * top_q).sum(-1)
        if self.rest_bin:
            kl_kept = (member * top_p * (top_logp - top_logq)).sum(-1)
            # rest mass summed directly (not 1 - kept, which loses the small rest to rounding):
            # the dropped top-K classes plus every class outside the top-K
            p_rest = ((1.0 - member) * top_p).sum(-1) + _mass_outside(logp, idx)
            q_rest = ((1.0 - member) * top_q).sum(-1) + _mass_outside(logq, idx)
            kl = kl_kept + torch.xlogy(p_rest, p_rest) - torch.xlogy(p_rest, q_rest.clamp_min(_EPS))
        else:
            log_pn = torch.log(p_kept.clamp_min(_EPS))
            log_qn = torch.log(q_kept.clamp_min(_EPS))
            kl = (member * top_p * ((top_logp - log_pn[:, None]) - (top_logq - log_qn[:, None]))).sum(-1) \
                / p_kept.clamp_min(_EPS)
        loss = kl
        if self.coverage_weight > 0 and self.coverage_floor > 0:
            # value: the retained teacher mass; gradient: that of the interval width u - l, which
            # the retained mass always exceeds and which, unlike the sigmoid memberships, never saturates
            width = upper - lower
            coverage = p_kept.detach() + (width - width.detach())
            loss = loss + self.coverage_weight * torch.relu(self.coverage_floor - coverage)
        with torch.no_grad():
            self.last_stats = {
                "dackl_kl": float(kl.mean()), "kept_classes": float(hard.sum(-1).mean()),
                "coverage": float(p_kept.mean()), "lower": float(lower.mean()), "upper": float(upper.mean())}
        return loss.mean()

    def extra_repr(self) -> str:
        return (f"top_k={self.top_k}, coverage_floor={self.coverage_floor}, fixed_bounds={self.fixed_bounds}, "
                f"rest_bin={self.rest_bin}, temperature={self.temperature}")


class DACKLTerm(Term):
    """``dac_kl`` as a recipe term: :class:`DACKL` on the policy's sequences; the term owns the clipper's
    parameters (they train with the student and are saved in checkpoints). Parameters: those of :class:`DACKL`."""

    needs_teacher = True
    params_of = DACKL.__init__

    def __init__(self, **params):
        super().__init__()
        self.dac = DACKL(**params)

    @classmethod
    def check_params(cls, params: dict, where: str) -> None:
        super().check_params(params, where)
        for k in ("coverage_floor", "coverage_weight", "sharpness"):
            v = params.get(k, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{where}: {k} must be a number, got {v!r}")
        for k, default in (("fixed_bounds", None), ("init_bounds", (0.02, 0.95))):
            v = params.get(k, default)
            if (v is not None or k == "init_bounds") and not (isinstance(v, (list, tuple)) and len(v) == 2 and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                null = " or null" if k == "fixed_bounds" else ""
                raise ConfigError(f"{where}: {k} must be a pair [low, high] in [0, 1]{null}, got {v!r}")
        try:
            with torch.random.fork_rng(devices=[]):   # DACKL's own checks, leaving the random state untouched
                DACKL(**params)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        return self.dac(inputs.student_logits, inputs.teacher_logits, inputs.logits_mask)
