"""Closed-form value and gradient of each divergence for one chunk of rows (used by ``chunked.py``).

With ``q = softmax(z / T)``, ``l = log q`` and a loss ``L(q)``, the gradient w.r.t. the student
logits is ``dL/dz = (a - q * sum(a)) / T`` with ``a_v = q_v dL/dq_v``.  Per divergence
(p teacher, m the mixture):

* fkl   KL(p||q):                      grad = (q - p) / T
* rkl   KL(q||p):                      a = q (l - log p + 1)              -> grad = q (l - log p - KL) / T
* jsd   b KL(p||m) + (1-b) KL(q||m),   m = b p + (1-b) q:  a = (1-b) q log(q/m)
* skl   KL(p||m),  m = a p + (1-a) q:  a_v = -(1-a) p_v q_v / m_v
* srkl  KL(q||m),  m = a q + (1-a) p:  a_v = q_v (log(q_v/m_v) + 1 - a q_v / m_v)
* tvd   1/2 sum|p - q|:                a = 1/2 q sign(q - p)
* symkl (1-lam) fkl + lam rkl
* sft   -log q_y:                      grad = (q - onehot(y)) / T

Working from these formulas instead of a local autograd graph needs far fewer passes over the
``[chunk, V]`` tensors and fewer of them alive at once (several updates are done in place).  The
values and gradients equal the autograd path of :mod:`lmdistill.losses.divergences` (tests check
this in float64).  The student logits come from ``hidden @ W.T`` and are finite; exact ``-inf``
teacher log-probabilities are floored as in ``divergences.py``.
"""

from __future__ import annotations

import math

import torch

from lmdistill.losses.divergences import LOGPROB_FLOOR, compute_dtype

_NAN, _INF = float("nan"), float("inf")


def _log_softmax_(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """In-place ``log_softmax(z / T)`` with exact -inf replaced by LOGPROB_FLOOR."""
    if temperature != 1.0:
        z.div_(temperature)
    z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))
    return torch.nan_to_num_(z, nan=_NAN, posinf=_INF, neginf=LOGPROB_FLOOR)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product ``sum_v a[:, v] * b[:, v]`` without a [C, V] temporary."""
    if torch.compiler.is_compiling():  # let the compiler fuse it into the surrounding loops
        return (a * b).sum(-1)
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _finish(a: torch.Tensor, q: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(a - q * sum(a)) / T``, in place in ``a``."""
    s = a.sum(-1, keepdim=True)
    a.addcmul_(q, s, value=-1.0)
    if temperature != 1.0:
        a.div_(temperature)
    return a


def value_and_grad(name: str, z: torch.Tensor, target: torch.Tensor, temperature: float,
                   params: dict, *, target_is_scratch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over rows of the loss and its gradient w.r.t. the student logits ``z`` ([C, V]).

    ``z`` is overwritten (it must be a scratch tensor in the compute dtype).  ``target`` holds the
    teacher logits ``[C, V]`` (or the labels ``[C]`` for ``sft``); it is overwritten only when
    ``target_is_scratch``.
    """
    t = temperature
    lq = _log_softmax_(z, t)
    q = lq.exp()
    if name == "sft":
        val = -lq.gather(-1, target[:, None]).sum()
        q.scatter_add_(-1, target[:, None], torch.full((q.shape[0], 1), -1.0, dtype=q.dtype, device=q.device))
        return val, (q.div_(t) if t != 1.0 else q)
    tl = target if target_is_scratch and target.dtype == lq.dtype else target.to(compute_dtype(target.dtype)).clone()
    lp = _log_softmax_(tl, t)
    if name == "jsd":
        beta = params["beta"]
        name = "fkl" if beta == 0.0 else "rkl" if beta == 1.0 else name
    if name in ("skl", "srkl"):
        alpha = params["alpha"]
        if alpha == 1.0:
            return z.new_zeros(()), torch.zeros_like(q)
        if alpha == 0.0:
            name = "fkl" if name == "skl" else "rkl"

    if name == "fkl":
        p = lp.exp()
        val = _rowdot(p, lp - lq).sum()
        grad = q.sub_(p)
        return val, (grad.div_(t) if t != 1.0 else grad)
    if name == "rkl":
        d = lq.sub_(lp)  # lq is no longer needed
        kl = _rowdot(q, d)
        grad = d.sub_(kl[:, None]).mul_(q)
        return kl.sum(), (grad.div_(t) if t != 1.0 else grad)
    if name == "symkl":
        lam = params["lam"]
        p = lp.exp()
        fval = _rowdot(p, lp - lq).sum()
        d = lq.sub_(lp)
        kl = _rowdot(q, d)
        # lam * q (d - kl) + (1 - lam) (q - p)
        grad = d.sub_(kl[:, None]).mul_(q).mul_(lam).add_(q, alpha=1.0 - lam).sub_(p, alpha=1.0 - lam)
        val = (1.0 - lam) * fval + lam * kl.sum()
        return val, (grad.div_(t) if t != 1.0 else grad)
    if name == "tvd":
        p = lp.exp()
        diff = q - p
        val = 0.5 * diff.abs().sum()
        a = diff.sign_().mul_(q).mul_(0.5)
        return val, _finish(a, q, t)
    if name == "jsd":
        beta = params["beta"]
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        p = lp.exp()
        klp = _rowdot(p, lp.sub_(lm))
        dq = lq.sub_(lm)
        klq = _rowdot(q, dq)
        val = beta * klp.sum() + (1.0 - beta) * klq.sum()
        grad = dq.sub_(klq[:, None]).mul_(q).mul_(1.0 - beta)
        return val, (grad.div_(t) if t != 1.0 else grad)
    if name == "skl":
        alpha = params["alpha"]
        lm = torch.logaddexp(lp + math.log(alpha), lq + math.log1p(-alpha))
        p = lp.exp()
        val = _rowdot(p, lp - lm).sum()
        a = lq.sub_(lm).exp_().mul_(p).mul_(-(1.0 - alpha))  # -(1-a) p q / m
        return val, _finish(a, q, t)
    if name == "srkl":
        alpha = params["alpha"]
        lm = torch.logaddexp(lq + math.log(alpha), lp + math.log1p(-alpha))
        d = lq.sub_(lm)  # log(q/m)
        val = _rowdot(q, d).sum()
        ratio = d.exp()  # q/m
        a = ratio.mul_(-alpha).add_(d).add_(1.0).mul_(q)
        return val, _finish(a, q, t)
    raise KeyError(name)


_compiled = None


def compiled_value_and_grad():
    """:func:`value_and_grad` through ``torch.compile`` (fuses the elementwise passes; compiled once
    per divergence and parameter values, the first call takes a while)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(value_and_grad, dynamic=True)
    return _compiled
