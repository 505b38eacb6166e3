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
``[chunk, V]`` tensors and fewer of them alive at once (several updates are done in place).  Each
softmax takes its probabilities from the same exponentials as its log-sum-exp, and the mixtures'
``log m`` is one log of ``b p + (1-b) q`` (clamped at the smallest normal number; its terms are then
0) instead of ``logaddexp``: three transcendental passes for jsd instead of seven.  Temporaries
come from a reusable :class:`Workspace` when the caller gives one.  The
values and gradients equal the autograd path of :mod:`lmdistill.losses.divergences` (tests check
this in float64).  The student logits come from ``hidden @ W.T`` and are finite; exact ``-inf``
teacher log-probabilities are floored as in ``divergences.py``.
"""

from __future__ import annotations

import torch

from lmdistill.losses.divergences import LOGPROB_FLOOR

_NAN, _INF = float("nan"), float("inf")


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


#: ``chunked_divergence`` runs :func:`value_and_grad` on row tiles of about this many vocab entries, so that the
#: tile's few ``[rows, V]`` buffers stay in the CPU's cache between the kernel's passes.
TILE_ELEMENTS = 1 << 21


def kernel_tile_rows(vocab: int) -> int:
    """Rows per kernel call for a ``vocab``-wide chunk (at least 1)."""
    return max(1, TILE_ELEMENTS // max(vocab, 1))


def _scratch(workspace: "Workspace | None", key: str, like: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(like) if workspace is None else workspace.get(key, like)


class Workspace:
    """Scratch buffers reused across kernel calls, one per key, so the ``[rows, V]`` temporaries of a chunked loss
    are allocated once per loss call instead of once per chunk (fresh large blocks come from ``mmap`` and cost a
    page fault per 4 KiB on first touch, which at 152k vocabularies took as long as the arithmetic)."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped, typed and placed like ``like`` (a view of the buffer ``key``)."""
        n = like.numel()
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._bufs[key] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(like.shape)


def _log_softmax_pair_(z: torch.Tensor, temperature: float, out: torch.Tensor, floor: bool) -> tuple:
    """In place ``z <- log_softmax(z / T)``, and ``out <- softmax(z / T)`` from the same exponentials.

    With ``floor`` exact -inf log-probabilities become LOGPROB_FLOOR (as in ``divergences.log_probs``)."""
    if temperature != 1.0:
        z.div_(temperature)
    z.sub_(z.amax(-1, keepdim=True))
    e = torch.exp(z, out=out)
    s = e.sum(-1, keepdim=True)
    z.sub_(s.log())
    e.div_(s)
    if floor:
        torch.nan_to_num_(z, nan=_NAN, posinf=_INF, neginf=LOGPROB_FLOOR)
    return z, e


def _log_mixture_(out: torch.Tensor, a: torch.Tensor, wa: float, b: torch.Tensor, wb: float) -> torch.Tensor:
    """``out <- log(wa a + wb b)`` for probabilities ``a, b`` (one log instead of ``logaddexp``'s exp and log1p);
    the mixture is clamped at the dtype's smallest normal number, so it is never log(0) (its terms are then 0)."""
    torch.mul(a, wa, out=out)
    out.add_(b, alpha=wb)
    return out.clamp_min_(torch.finfo(out.dtype).tiny).log_()


def _mixture_(out: torch.Tensor, a: torch.Tensor, wa: float, b: torch.Tensor, wb: float) -> torch.Tensor:
    torch.mul(a, wa, out=out)
    out.add_(b, alpha=wb)
    return out.clamp_min_(torch.finfo(out.dtype).tiny)


def value_and_grad(name: str, z: torch.Tensor, target: torch.Tensor, temperature: float, params: dict, *,
                   target_is_scratch: bool = False, workspace: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over rows of the loss and its gradient w.r.t. the student logits ``z`` ([C, V]).

    ``z`` is overwritten (it must be a scratch tensor in the compute dtype, holding finite logits).  ``target``
    holds the teacher logits ``[C, V]`` (or the labels ``[C]`` for ``sft``); it is overwritten only when
    ``target_is_scratch``.  The gradient is returned in ``z`` or in a ``workspace`` buffer (a fresh tensor without
    one); temporaries come from ``workspace`` when given.
    """
    t = temperature
    lq, q = _log_softmax_pair_(z, t, _scratch(workspace, "q", z), floor=False)
    if name == "sft":
        val = -lq.gather(-1, target[:, None]).sum()
        q.scatter_add_(-1, target[:, None], torch.full((q.shape[0], 1), -1.0, dtype=q.dtype, device=q.device))
        return val, (q.div_(t) if t != 1.0 else q)
    if target_is_scratch and target.dtype == lq.dtype:
        tl = target
    else:
        tl = _scratch(workspace, "t", lq)
        tl.copy_(target)
    lp, p = _log_softmax_pair_(tl, t, _scratch(workspace, "p", lq), floor=True)
    if name == "jsd":
        beta = params["beta"]
        name = "fkl" if beta == 0.0 else "rkl" if beta == 1.0 else name
    if name in ("skl", "srkl"):
        alpha = params["alpha"]
        if alpha == 1.0:
            return z.new_zeros(()), z.zero_()
        if alpha == 0.0:
            name = "fkl" if name == "skl" else "rkl"

    if name == "fkl":
        val = _rowdot(p, lp.sub_(lq)).sum()
        grad = q.sub_(p)
        return val, (grad.div_(t) if t != 1.0 else grad)
    if name == "rkl":
        d = lq.sub_(lp)
        kl = _rowdot(q, d)
        grad = d.sub_(kl[:, None]).mul_(q)
        return kl.sum(), (grad.div_(t) if t != 1.0 else grad)
    if name == "symkl":
        lam = params["lam"]
        d = lq.sub_(lp)
        fval = -_rowdot(p, d).sum()  # sum p (lp - lq)
        kl = _rowdot(q, d)
        # lam * q (d - kl) + (1 - lam) (q - p)
        grad = d.sub_(kl[:, None]).mul_(q).mul_(lam).add_(q, alpha=1.0 - lam).sub_(p, alpha=1.0 - lam)
        val = (1.0 - lam) * fval + lam * kl.sum()
        return val, (grad.div_(t) if t != 1.0 else grad)
    if name == "tvd":
        diff = torch.sub(q, p, out=lq)  # lq is no longer needed
        val = 0.5 * torch.linalg.vector_norm(diff, 1)
        a = diff.sign_().mul_(q).mul_(0.5)
        return val, _finish(a, q, t)
    if name == "jsd":
        beta = params["beta"]
        lm = _log_mixture_(_scratch(workspace, "m", lq), p, beta, q, 1.0 - beta)
        klp = _rowdot(p, lp.sub_(lm))
        dq = lq.sub_(lm)
        klq = _rowdot(q, dq)
        val = beta * klp.sum() + (1.0 - beta) * klq.sum()
        grad = dq.sub_(klq[:, None]).mul_(q).mul_(1.0 - beta)
        return val, (grad.div_(t) if t != 1.0 else grad)
    if name == "skl":
        alpha = params["alpha"]
        m = _mixture_(_scratch(workspace, "m", lq), p, alpha, q, 1.0 - alpha)
        a = torch.mul(p, q, out=lq).div_(m).mul_(-(1.0 - alpha))  # -(1-a) p q / m; lq is no longer needed
        val = _rowdot(p, lp.sub_(m.log_())).sum()
        return val, _finish(a, q, t)
    if name == "srkl":
        alpha = params["alpha"]
        m = _mixture_(_scratch(workspace, "m", lq), q, alpha, p, 1.0 - alpha)
        ratio = torch.div(q, m, out=lp)  # q/m; lp is no longer needed
        d = lq.sub_(m.log_())  # log(q/m)
        val = _rowdot(q, d).sum()
        a = ratio.mul_(-alpha).add_(d).add_(1.0).mul_(q)
        return val, _finish(a, q, t)
    raise KeyError(name)


_compiled = None


def compiled_value_and_grad():
    """:func:`value_and_grad` through ``torch.compile`` (fuses the elementwise passes; compiled once
    per divergence, parameter values and chunk shape, the first call takes a while).

    Compiled with static shapes: with ``dynamic=True`` Inductor (torch 2.13) treated the float parameters
    symbolically and returned wrong values (jsd with beta=0.5 reused the beta=0.3 graph; jsd 0.693 for 0.460
    under no_grad at one thread). tests/test_losses_chunked.py checks each divergence against the eager kernel.
    A shape past torch's recompile limit runs eagerly (same values)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(value_and_grad, dynamic=False)
    return _compiled
