"""Token-level divergences between the teacher's and the student's next-token distributions.

Notation: ``p`` is the teacher distribution ``softmax(teacher_logits / T)``, ``q`` the student
distribution ``softmax(student_logits / T)``, sums run over the vocabulary.  Every divergence is
the true one (entropy term included), so it is >= 0 and exactly 0 when ``p == q``.

=========  =====================================================================  ==============
name       per-token formula                                                      parameter
=========  =====================================================================  ==============
``fkl``    KL(p||q) = sum p (log p - log q)                                       --
``rkl``    KL(q||p)                                                               --
``jsd``    beta KL(p||M) + (1-beta) KL(q||M),  M = beta p + (1-beta) q            ``beta=0.5``
           (beta=0 -> KL(p||q), beta=1 -> KL(q||p); TRL's generalized JSD)
``tvd``    1/2 sum |p - q|                                                        --
``skl``    KL(p || alpha p + (1-alpha) q)                                         ``alpha=0.1``
``srkl``   KL(q || alpha q + (1-alpha) p)                                         ``alpha=0.1``
``symkl``  (1-lam) KL(p||q) + lam KL(q||p)  (DistiLLM uses lam=0.9)               ``lam=0.5``
=========  =====================================================================  ==============

Numerics: everything is computed from ``log_softmax`` in float32 (float64 stays float64) and
mixtures with ``logsumexp``.  Log-probabilities that are exactly ``-inf`` (vocabulary entries
masked with ``-inf`` logits) are replaced by :data:`LOGPROB_FLOOR` before any arithmetic, so
``0 * log 0`` terms are 0 and neither values nor gradients become NaN (a ``torch.where`` whose
unused branch were ``-inf - -inf`` would poison the backward pass).  Where the student gives
probability exactly 0 to a class the teacher supports, KL is infinite in theory; here it is
large but finite (``p * (log p - LOGPROB_FLOOR)``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from lmdistill.errors import ConfigError
from lmdistill.losses.vocab import LossInputError, align_vocab

#: Stand-in for log(0): exp(LOGPROB_FLOOR) underflows to exactly 0 in float32 and float64.
LOGPROB_FLOOR = -1.0e4

#: Divergence names and their parameters with defaults.
DIVERGENCE_PARAMS: dict[str, dict[str, float]] = {
    "fkl": {},
    "rkl": {},
    "jsd": {"beta": 0.5},
    "tvd": {},
    "skl": {"alpha": 0.1},
    "srkl": {"alpha": 0.1},
    "symkl": {"lam": 0.5},
}


def check_divergence_params(name: str, params: dict) -> dict[str, float]:
    """Validate ``name`` and ``params``; return the full parameter dict (defaults filled in)."""
    if name not in DIVERGENCE_PARAMS:
        raise ConfigError(f"unknown divergence {name!r}; valid: {', '.join(DIVERGENCE_PARAMS)}")
    allowed = DIVERGENCE_PARAMS[name]
    extra = sorted(set(params) - set(allowed))
    if extra:
        valid = ", ".join(allowed) if allowed else "none"
        raise ConfigError(f"divergence {name!r} got unknown parameter(s) {', '.join(extra)}; valid: {valid}")
    full = {**allowed, **params}
    for key, value in full.items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"divergence {name!r}: {key} must be a number, got {value!r}") from None
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"divergence {name!r}: {key} must be in [0, 1], got {value}")
        full[key] = value
    return full


def check_temperature(temperature: float) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ConfigError(f"temperature must be a positive number, got {temperature!r}") from None
    if not (t > 0.0 and math.isfinite(t)):
        raise ConfigError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating type is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / T)`` in the compute dtype, with exact ``-inf`` replaced by LOGPROB_FLOOR."""
    x = logits.to(compute_dtype(logits.dtype))
    if temperature != 1.0:
        x = x / temperature
    lp = torch.log_softmax(x, dim=-1)
    # the branch that is not taken gets a zero gradient, and log_softmax's backward is finite at -inf
    return torch.where(torch.isneginf(lp), torch.full_like(lp, LOGPROB_FLOOR), lp)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a||b) = sum a (log a - log b) over the last dim; inputs are floored log-probs."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w a + (1-w) b) for 0 < w < 1, computed with a two-term logsumexp."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def fkl_from_logprobs(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Forward KL: KL(p||q) = sum_v p_v (log p_v - log q_v)."""
    return _kl(logp, logq)


def rkl_from_logprobs(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Reverse KL: KL(q||p) = sum_v q_v (log q_v - log p_v)."""
    return _kl(logq, logp)


def jsd_from_logprobs(logq: torch.Tensor, logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized JSD: beta KL(p||M) + (1-beta) KL(q||M), M = beta p + (1-beta) q.

    beta = 0 gives KL(p||q) and beta = 1 gives KL(q||p) (the limits of the scaled form used by GKD
    and TRL's ``generalized_jsd_loss``).
    """
    if beta == 0.0:
        return _kl(logp, logq)
    if beta == 1.0:
        return _kl(logq, logp)
    logm = _mix(logp, logq, beta)
    return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)


def tvd_from_logprobs(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Total variation distance: 1/2 sum_v |p_v - q_v|."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def skl_from_logprobs(logq: torch.Tensor, logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew forward KL: KL(p || alpha p + (1-alpha) q); alpha=0 is KL(p||q), alpha=1 is 0."""
    if alpha == 0.0:
        return _kl(logp, logq)
    if alpha == 1.0:
        return 0.0 * (logp[..., 0] + logq[..., 0])  # keeps the graph
    return _kl(logp, _mix(logp, logq, alpha))


def srkl_from_logprobs(logq: torch.Tensor, logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL: KL(q || alpha q + (1-alpha) p); alpha=0 is KL(q||p), alpha=1 is 0."""
    if alpha == 0.0:
        return _kl(logq, logp)
    if alpha == 1.0:
        return 0.0 * (logp[..., 0] + logq[..., 0])  # keeps the graph
    return _kl(logq, _mix(logq, logp, alpha))


def symkl_from_logprobs(logq: torch.Tensor, logp: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """Symmetric KL: (1-lam) KL(p||q) + lam KL(q||p)."""
    return (1.0 - lam) * _kl(logp, logq) + lam * _kl(logq, logp)


_FROM_LOGPROBS: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": fkl_from_logprobs,
    "rkl": rkl_from_logprobs,
    "jsd": jsd_from_logprobs,
    "tvd": tvd_from_logprobs,
    "skl": skl_from_logprobs,
    "srkl": srkl_from_logprobs,
    "symkl": symkl_from_logprobs,
}


def divergence_from_logprobs(name: str, student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                             **params) -> torch.Tensor:
    """Per-position divergence from (floored) log-probabilities of equal shape; no checks, no reduction."""
    return _FROM_LOGPROBS[name](student_logprobs, teacher_logprobs, **params)


def per_token_divergence(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                         temperature: float = 1.0, vocab_size: int | None = None, **params) -> torch.Tensor:
    """The divergence ``name`` at every position (no reduction).

    Args:
        name: one of ``fkl, rkl, jsd, tvd, skl, srkl, symkl`` (formulas in the module docstring).
        student_logits: ``[..., V_s]`` student logits (q).
        teacher_logits: ``[..., V_t]`` teacher logits (p); same leading shape.  Vocabularies that
            differ only by padding rows are compared on the shared prefix (see ``vocab.py``).
        temperature: both distributions are ``softmax(logits / temperature)``.
        vocab_size: optional tokenizer length, used to decide what counts as padding.
        **params: ``beta`` (jsd), ``alpha`` (skl, srkl), ``lam`` (symkl).

    Returns:
        Tensor of shape ``[...]`` (float32, or float64 for float64 inputs).
    """
    full = check_divergence_params(name, params)
    t = check_temperature(temperature)
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size=vocab_size)
    if student_logits.shape[-1] == 0:
        raise LossInputError("logits have an empty vocabulary dimension")
    logq = log_probs(student_logits, t)
    logp = log_probs(teacher_logits, t)
    return divergence_from_logprobs(name, logq, logp, **full)
