"""Masked token-mean distillation losses and the SFT cross-entropy.

Each divergence loss has the signature
``(student_logits, teacher_logits, mask=None, *, temperature=1.0, <param>, vocab_size=None)``
with logits ``[batch, seq, vocab]`` (any leading shape works) and returns the mean of the
per-token divergence (see :mod:`lmdistill.losses.divergences`) over positions where ``mask`` is
1, or over all positions when ``mask`` is None.  With an empty mask the loss is 0.

Only the trained positions are computed, so padding never changes the value or the gradient.
"""

from __future__ import annotations

import torch

from lmdistill.losses.divergences import (
    check_divergence_params, check_temperature, divergence_from_logprobs, log_probs)
from lmdistill.losses.masking import as_bool_mask, graph_zero, select
from lmdistill.losses.vocab import LossInputError, align_vocab


def _masked_divergence(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       mask: torch.Tensor | None, temperature: float, vocab_size: int | None,
                       params: dict) -> torch.Tensor:
    full = check_divergence_params(name, params)
    t = check_temperature(temperature)
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size=vocab_size)
    bmask = as_bool_mask(mask, student_logits.shape[:-1], student_logits.device)
    s = select(student_logits, bmask)
    tt = select(teacher_logits, bmask)
    if s.shape[0] == 0:
        return graph_zero(student_logits)
    return divergence_from_logprobs(name, log_probs(s, t), log_probs(tt, t), **full).mean()


def forward_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, vocab_size=None):
    """Forward KL, masked token mean of KL(p||q) = sum_v p_v (log p_v - log q_v).

    p = softmax(teacher_logits / T), q = softmax(student_logits / T).
    """
    return _masked_divergence("fkl", student_logits, teacher_logits, mask, temperature, vocab_size, {})


def reverse_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, vocab_size=None):
    """Reverse KL, masked token mean of KL(q||p) = sum_v q_v (log q_v - log p_v)."""
    return _masked_divergence("rkl", student_logits, teacher_logits, mask, temperature, vocab_size, {})


def jsd(student_logits, teacher_logits, mask=None, *, temperature=1.0, beta=0.5, vocab_size=None):
    """Generalized JSD, masked token mean of beta KL(p||M) + (1-beta) KL(q||M), M = beta p + (1-beta) q.

    The teacher is P.  beta=0 gives forward KL(p||q), beta=1 reverse KL(q||p); for 0<beta<1 the
    values equal TRL's ``generalized_jsd_loss`` averaged over the same tokens.
    """
    return _masked_divergence("jsd", student_logits, teacher_logits, mask, temperature, vocab_size,
                              {"beta": beta})


def tvd(student_logits, teacher_logits, mask=None, *, temperature=1.0, vocab_size=None):
    """Total variation distance, masked token mean of 1/2 sum_v |p_v - q_v|."""
    return _masked_divergence("tvd", student_logits, teacher_logits, mask, temperature, vocab_size, {})


def skew_forward_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, alpha=0.1, vocab_size=None):
    """Skew forward KL (DistiLLM), masked token mean of KL(p || alpha p + (1-alpha) q)."""
    return _masked_divergence("skl", student_logits, teacher_logits, mask, temperature, vocab_size,
                              {"alpha": alpha})


def skew_reverse_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, alpha=0.1, vocab_size=None):
    """Skew reverse KL (DistiLLM), masked token mean of KL(q || alpha q + (1-alpha) p)."""
    return _masked_divergence("srkl", student_logits, teacher_logits, mask, temperature, vocab_size,
                              {"alpha": alpha})


def symmetric_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, lam=0.5, vocab_size=None):
    """Symmetric KL, masked token mean of (1-lam) KL(p||q) + lam KL(q||p).

    lam=0.5 is half the Jeffreys divergence; DistiLLM's ``symmetric_kl`` uses lam=0.9.
    """
    return _masked_divergence("symkl", student_logits, teacher_logits, mask, temperature, vocab_size,
                              {"lam": lam})


IGNORE_INDEX = -100


def sft_loss(student_logits, labels, mask=None, *, temperature=1.0):
    """Cross-entropy on the target tokens: masked token mean of -log q(y_t).

    ``labels[b, t]`` is the token that position t's logits predict (aligned, callers shift).
    Positions where ``mask`` is 0 or the label is -100 are ignored.  ``temperature`` defaults to 1
    (plain SFT); it is accepted so the registry can pass one uniformly.
    """
    t = check_temperature(temperature)
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.shape != student_logits.shape[:-1]:
        raise LossInputError(f"labels shape {tuple(labels.shape)} does not match the logits positions "
                             f"{tuple(student_logits.shape[:-1])}")
    if labels.is_floating_point():
        raise LossInputError("labels must be integer token ids")
    labels = labels.to(student_logits.device)
    keep = labels != IGNORE_INDEX
    bmask = as_bool_mask(mask, labels.shape, student_logits.device)
    if bmask is not None:
        keep = keep & bmask
    y = labels[keep]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= student_logits.shape[-1]):
        raise LossInputError(f"labels must be in [0, {student_logits.shape[-1]}) or -100")
    rows = student_logits[keep]
    if rows.shape[0] == 0:
        return graph_zero(student_logits)
    lp = log_probs(rows, t)
    return -lp.gather(-1, y[:, None]).squeeze(-1).mean()
