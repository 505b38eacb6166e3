"""Chunked divergence from hidden states: never more than one chunk of vocab-sized tensors alive.

Materialising ``[batch, seq, vocab]`` float32 logits and log-probabilities for both models is
what runs knowledge distillation out of memory at 128k-152k vocabularies.  This path takes the
student's final hidden states ``[B, T, H]`` and LM-head weight ``[V, H]`` (and either the
teacher's logits or its hidden states and head) and walks over the trained tokens in chunks of
``chunk_size`` rows.  For each chunk it computes the student logits ``h_c W^T``, the divergence
and its gradient w.r.t. the chunk's logits ``g_c`` (closed forms, :mod:`.chunk_kernels`); it then folds
``g_c`` into ``dL/dh_c = g_c W`` and ``dL/dW += g_c^T h_c`` and drops the chunk.  The gradients are
therefore computed during the forward pass (as Liger-Kernel's fused linear losses do) and the
backward pass only scales them by the incoming gradient, so neither pass holds more than one
chunk of ``[chunk, V]`` tensors.

Values and gradients equal the direct path ``loss(f(h @ W.T), teacher_logits, mask)`` up to floating
point summation order, ``f`` being what the model's forward applies after its LM head (``student_transform``,
``teacher_transform``: Gemma's soft-cap, Cohere's scale; nothing for Llama-family models), applied inside each
chunk with its derivative folded into the chunk's gradient.  The teacher receives no gradient (its inputs are
treated as constants).
The function is differentiable once (no double backward).
"""

from __future__ import annotations

import torch

from lmdistill.errors import ConfigError
from lmdistill.losses.chunk_kernels import Workspace, compiled_value_and_grad, kernel_tile_rows, value_and_grad
from lmdistill.losses.divergences import check_divergence_params, check_temperature, compute_dtype
from lmdistill.losses.functional import IGNORE_INDEX
from lmdistill.losses.masking import as_bool_mask, graph_zero
from lmdistill.losses.model_logits import LogitTransform
from lmdistill.losses.sparse import SparseTeacher, sparse_value_and_grad
from lmdistill.losses.vocab import LossInputError, shared_vocab

#: With ``chunk_size=None`` a chunk holds about this many vocab entries (rows = budget // V).
CHUNK_ELEMENTS = 1 << 25


def auto_chunk_size(vocab: int) -> int:
    """Rows per chunk so that one ``[chunk, vocab]`` float32 tensor is about 128 MiB (the student's and the
    teacher's logits buffers; larger matmuls run closer to the BLAS peak)."""
    return max(8, min(4096, CHUNK_ELEMENTS // max(vocab, 1)))


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out <- a @ b`` (in ``out``'s dtype), written in place when the dtypes agree."""
    if a.dtype == b.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    return out.copy_(a @ b)


class _ChunkedLoss(torch.autograd.Function):
    """Mean loss over N rows; gradients w.r.t. hidden [N,H] and weight [V,H] built chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_rows, teacher_hidden, teacher_weight, labels,
                name, temperature, params, chunk_size, kernel, s_transform, t_transform):
        n = hidden.shape[0]
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.empty(weight.shape, dtype=torch.float32 if weight.dtype != torch.float64 else weight.dtype,
                             device=weight.device) if need_w else None  # the first chunk writes it, no zero-fill
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        cdtype = compute_dtype(hidden.dtype)
        scale = 1.0 / n
        # One [chunk, V] buffer each for the student's and the teacher's logits, reused by every chunk; our
        # closed-form kernel then runs on row tiles of them that stay in cache, its temporaries in `ws`.
        tiled = kernel is value_and_grad
        ws = Workspace() if tiled else None
        tile = kernel_tile_rows(weight.shape[0]) if tiled else chunk_size
        zbuf = torch.empty((min(chunk_size, n), weight.shape[0]), dtype=cdtype, device=hidden.device)
        tbuf = dbuf = None
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            h = hidden[start:stop]
            logits = _mm_into(zbuf[:stop - start], h, weight.T)
            d_const, d_tensor = 1.0, None
            if s_transform is not None:  # the student's own logits; f'(z) kept for the gradient
                if dbuf is None and any(step == "softcap" for step, _, _ in s_transform.steps):
                    dbuf = torch.empty_like(zbuf)
                d_const, d_tensor = s_transform.apply_(logits, None if dbuf is None else dbuf[:stop - start])
            if name == "sft":
                target = labels[start:stop]
                scratch = False
            else:
                target = teacher_rows(start, stop) if teacher_rows is not None else None
                if target is None or isinstance(target, torch.Tensor):  # dense teacher: logits into its buffer
                    if tbuf is None:
                        tbuf = torch.empty_like(zbuf)
                    tb = tbuf[:stop - start]
                    if target is not None:
                        target = tb.copy_(target)
                    else:
                        target = _mm_into(tb, teacher_hidden[start:stop], teacher_weight.T)
                        if t_transform is not None:
                            t_transform.apply_(target)
                    scratch = True
                else:
                    scratch = False
            if tiled:
                loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
                for r0 in range(0, stop - start, tile):
                    zt = logits[r0:r0 + tile]
                    val, g = kernel(name, zt, target[r0:r0 + tile], temperature, params,
                                    target_is_scratch=scratch, workspace=ws)
                    if need_h or need_w:
                        torch.mul(g, scale, out=zt)  # the gradient goes back into the logits' buffer
                    loss += val.to(torch.float64)
                g = logits
            else:
                loss, g = kernel(name, logits, target, temperature, params, target_is_scratch=scratch)
                if need_h or need_w:
                    g = g.mul_(scale)
            if need_h or need_w:
                if d_tensor is not None:  # dL/dz = dL/df * f'(z)
                    g.mul_(d_tensor)
                if d_const != 1.0:
                    g.mul_(d_const)
                g = g.to(weight.dtype)
                if need_h:
                    _mm_into(grad_h[start:stop], g, weight)
                if need_w:
                    if start == 0:
                        torch.mm(g.T.to(grad_w.dtype), h.to(grad_w.dtype), out=grad_w)
                    else:
                        grad_w.addmm_(g.T.to(grad_w.dtype), h.to(grad_w.dtype))
            total += loss.to(torch.float64)
            del logits, loss, target, g
        del zbuf, tbuf, ws, dbuf
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        return (total * scale).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        unit = bool(grad_out == 1)  # the usual case (loss.backward()): no [V, H] copy
        gh = gw = None
        if grad_h is not None:
            gh = grad_h if unit else grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            gw = (grad_w if unit else grad_w * grad_out.to(grad_w.dtype)).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None, None, None, None, None, None, None


def chunked_divergence(name: str, student_hidden: torch.Tensor, student_head_weight: torch.Tensor,
                       teacher_logits: torch.Tensor | None = None, *, teacher_hidden: torch.Tensor | None = None,
                       teacher_head_weight: torch.Tensor | None = None, teacher_sparse: SparseTeacher | None = None,
                       mask: torch.Tensor | None = None,
                       temperature: float = 1.0, chunk_size: int | None = None, labels: torch.Tensor | None = None,
                       vocab_size: int | None = None, compile: bool = False,
                       student_transform: LogitTransform | None = None, teacher_transform: LogitTransform | None = None,
                       **params) -> torch.Tensor:
    """Masked token mean of divergence ``name`` between ``f(h W^T)`` (student) and the teacher, in chunks.

    Args:
        name: ``fkl, rkl, jsd, tvd, skl, srkl, symkl`` (formulas in :mod:`lmdistill.losses.divergences`)
            or ``sft`` (mean of -log q(label); give ``labels``, no teacher).
        student_hidden: ``[B, T, H]`` final hidden states of the student (after the final norm).
        student_head_weight: ``[V_s, H]`` LM-head weight (logits = hidden @ weight.T, no bias).
        teacher_logits: ``[B, T, V_t]`` teacher logits, or ``None`` when ``teacher_hidden`` and
            ``teacher_head_weight`` (``[B, T, H_t]``, ``[V_t, H_t]``) are given instead, in which
            case teacher logits are computed per chunk and never held in full.
        teacher_sparse: instead of both, a :class:`~lmdistill.losses.sparse.SparseTeacher` (top-k log-probabilities
            and tail) at the trained positions in row-major order; the divergence is then taken on its K + 1 bins
            (:mod:`lmdistill.losses.sparse`).
        mask: ``[B, T]`` 0/1, aligned with logits positions (1 = trained).
        temperature: both distributions are softmax(logits / T).
        chunk_size: token rows per chunk; ``None`` picks about 2**25 vocab entries per chunk.
        labels: ``[B, T]`` target ids for ``sft`` (-100 ignored).
        vocab_size: optional tokenizer length, to judge vocabulary padding (see ``vocab.py``).
        compile: run the per-chunk kernel through ``torch.compile`` (fewer passes over each chunk;
            the first call compiles).
        student_transform: what the student's forward applies after its LM head
            (:class:`~lmdistill.losses.model_logits.LogitTransform`: Gemma's ``cap * tanh(z / cap)``, Cohere's scale);
            applied to each chunk's ``h W^T`` in the compute dtype, and its derivative (``1 - tanh^2`` for the cap)
            multiplies the chunk's gradient. ``None``: the logits are ``h W^T``.
        teacher_transform: the same for the teacher, with ``teacher_hidden`` (``teacher_logits`` are the forward's).
        **params: ``beta`` (jsd), ``alpha`` (skl, srkl), ``lam`` (symkl).

    Returns:
        Scalar: the mean over trained positions (0 when there are none).
    """
    t = check_temperature(temperature)
    if name == "sft":
        if params:
            raise ConfigError(f"loss 'sft' takes no parameters, got {', '.join(sorted(params))}")
        full: dict = {}
    else:
        full = check_divergence_params(name, params)
    if student_hidden.dim() < 2 or student_head_weight.dim() != 2:
        raise LossInputError("student_hidden must be [..., H] and student_head_weight [V, H]")
    hdim = student_hidden.shape[-1]
    if student_head_weight.shape[1] != hdim:
        raise LossInputError(f"student_head_weight {tuple(student_head_weight.shape)} does not match hidden size {hdim}")
    lead = student_hidden.shape[:-1]
    v_s = student_head_weight.shape[0]
    weight = student_head_weight
    bmask = as_bool_mask(mask, lead, student_hidden.device)

    labels_rows = teacher_rows = t_hidden = t_weight = None
    if name == "sft":
        if labels is None or teacher_logits is not None or teacher_hidden is not None:
            raise LossInputError("sft takes labels= and no teacher inputs")
        labels = torch.as_tensor(labels, device=student_hidden.device)
        if labels.shape != lead or labels.is_floating_point():
            raise LossInputError(f"labels must be integer ids of shape {tuple(lead)}, got {tuple(labels.shape)}")
        keep = labels != IGNORE_INDEX
        bmask = keep if bmask is None else bmask & keep
    else:
        if labels is not None:
            raise LossInputError("labels= is only for name='sft'")
        if sum(x is not None for x in (teacher_logits, teacher_hidden, teacher_sparse)) != 1:
            raise LossInputError("give one of teacher_logits, teacher_hidden with teacher_head_weight, teacher_sparse")
        if teacher_sparse is not None:
            v_t = teacher_sparse.vocab or v_s
        elif teacher_logits is not None:
            if teacher_logits.shape[:-1] != lead:
                raise LossInputError(f"teacher logits {tuple(teacher_logits.shape)} and student hidden "
                                     f"{tuple(student_hidden.shape)} differ outside the last dimension")
            v_t = teacher_logits.shape[-1]
        else:
            if teacher_head_weight is None or teacher_head_weight.dim() != 2:
                raise LossInputError("teacher_hidden needs teacher_head_weight [V_t, H_t]")
            if teacher_hidden.shape[:-1] != lead or teacher_hidden.shape[-1] != teacher_head_weight.shape[1]:
                raise LossInputError(f"teacher hidden {tuple(teacher_hidden.shape)} / head "
                                     f"{tuple(teacher_head_weight.shape)} do not match student positions {tuple(lead)}")
            v_t = teacher_head_weight.shape[0]
        v = shared_vocab(v_s, v_t, vocab_size=vocab_size)
        if v != v_s:
            weight = student_head_weight[:v]

    if teacher_transform is not None and teacher_hidden is None:
        raise LossInputError("teacher_transform= applies to teacher_hidden only (teacher logits are the forward's)")
    flat_h = student_hidden.reshape(-1, hdim)
    idx = None if bmask is None else bmask.reshape(-1).nonzero().squeeze(-1)
    hidden = flat_h if idx is None else flat_h.index_select(0, idx)
    if hidden.shape[0] == 0:
        return graph_zero(student_hidden) + graph_zero(student_head_weight)
    if name == "sft":
        lab = labels.reshape(-1)
        labels_rows = lab if idx is None else lab.index_select(0, idx)
        if int(labels_rows.min()) < 0 or int(labels_rows.max()) >= v_s:
            raise LossInputError(f"labels must be in [0, {v_s}) or -100")
    elif teacher_sparse is not None:
        if len(teacher_sparse) != hidden.shape[0]:
            raise LossInputError(f"the sparse teacher has {len(teacher_sparse)} positions, the mask selects "
                                 f"{hidden.shape[0]}")
        teacher_rows = teacher_sparse.rows
    elif teacher_logits is not None:
        t_flat = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
        v_cut = v

        def teacher_rows(start: int, stop: int) -> torch.Tensor:
            rows = t_flat[start:stop] if idx is None else t_flat.index_select(0, idx[start:stop])
            return rows[:, :v_cut]
    else:
        th = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        t_hidden = th if idx is None else th.index_select(0, idx)
        t_weight = teacher_head_weight.detach()[:v]

    vocab = weight.shape[0]
    rows = chunk_size if chunk_size is not None else auto_chunk_size(vocab)
    if not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    kernel = sparse_value_and_grad if teacher_sparse is not None else \
        compiled_value_and_grad() if compile else value_and_grad
    s_tf = None if student_transform is None or student_transform.identity else student_transform
    t_tf = None if teacher_transform is None or teacher_transform.identity else teacher_transform
    return _ChunkedLoss.apply(hidden, weight, teacher_rows, t_hidden, t_weight, labels_rows,
                              name, t, full, rows, kernel, s_tf, t_tf)
