"""Divergences against a sparse (top-k + tail) teacher: dense parity at K = V, a brute-force float64 reference at
K < V, the data-processing bound, the chunked form and the errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.losses import LossInputError, chunked_divergence, get_loss
from lmdistill.losses.sparse import SparseTeacher, sparse_divergence, sparse_per_token, top_k_teacher

CASES = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.9}),
         ("tvd", {}), ("skl", {"alpha": 0.1}), ("srkl", {"alpha": 0.3}), ("symkl", {"lam": 0.9})]


def _logits(n=7, v=30, seed=0, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=dtype) * scale,
            torch.randn(n, v, generator=g, dtype=dtype) * scale)


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
def test_full_k_equals_dense_loss_and_gradient(name, params, dtype, tol):
    s, t = _logits(dtype=dtype)
    s.requires_grad_(True)
    teacher = top_k_teacher(t, k=t.shape[-1])
    got = sparse_divergence(name, s, teacher, **params)
    (g_got,) = torch.autograd.grad(got, s)
    want = get_loss(name, **params)(s, t)
    (g_want,) = torch.autograd.grad(want, s)
    assert abs(float(got.detach()) - float(want.detach())) <= tol * max(1.0, abs(float(want.detach())))
    assert torch.allclose(g_got, g_want, atol=tol, rtol=0)


def _reference_bins(s: np.ndarray, t: np.ndarray, k: int):
    """Brute force, float64, one position at a time: the K + 1 bins of both distributions."""
    out = []
    for srow, trow in zip(s, t):
        p = np.exp(trow - trow.max()); p /= p.sum()
        q = np.exp(srow - srow.max()); q /= q.sum()
        top = sorted(range(len(p)), key=lambda i: -p[i])[:k]
        rest = [i for i in range(len(p)) if i not in top]
        out.append((np.array([p[i] for i in top] + [sum(p[i] for i in rest)]),
                    np.array([q[i] for i in top] + [sum(q[i] for i in rest)])))
    return out


def _ref_divergence(name, p, q, params):
    def kl(a, b):
        return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)
    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum()
    if name == "jsd":
        b = params["beta"]
        if b == 0.0:
            return kl(p, q)
        m = b * p + (1 - b) * q
        return b * kl(p, m) + (1 - b) * kl(q, m)
    if name == "skl":
        a = params["alpha"]
        return kl(p, a * p + (1 - a) * q)
    if name == "srkl":
        a = params["alpha"]
        return kl(q, a * q + (1 - a) * p)
    if name == "symkl":
        lam = params["lam"]
        return (1 - lam) * kl(p, q) + lam * kl(q, p)
    raise KeyError(name)


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("k", [1, 4, 29])
def test_top_k_equals_brute_force_reference(name, params, k):
    s, t = _logits(seed=k)
    teacher = top_k_teacher(t, k=k)
    got = sparse_per_token(name, s, teacher, **params).numpy()
    want = [_ref_divergence(name, p, q, params) for p, q in _reference_bins(s.numpy(), t.numpy(), k)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_tail_is_the_mass_outside_the_top_k():
    _, t = _logits(seed=3)
    teacher = top_k_teacher(t, k=5)
    p = torch.softmax(t, -1)
    want = 1.0 - p.gather(-1, teacher.ids).sum(-1)
    assert torch.allclose(teacher.rest.exp(), want, atol=1e-12)
    assert torch.allclose(teacher.logprobs, torch.log_softmax(t, -1).gather(-1, teacher.ids), atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 12), name_i=st.integers(0, len(CASES) - 1),
       scale=st.floats(0.1, 8.0))
def test_merging_the_tail_never_raises_a_divergence(seed, k, name_i, scale):
    """Data processing inequality: the K + 1 bins are a coarse-graining of both distributions."""
    name, params = CASES[name_i]
    s, t = _logits(n=5, v=13, seed=seed, scale=scale)
    dense = torch.stack([get_loss(name, **params)(s[i:i + 1], t[i:i + 1]) for i in range(5)])
    sparse = sparse_per_token(name, s, top_k_teacher(t, k=k), **params)
    assert torch.all(sparse <= dense + 1e-9)


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("chunk", [2, 64])
def test_chunked_sparse_equals_direct_sparse(name, params, chunk):
    g = torch.Generator().manual_seed(chunk)
    hs = torch.randn(2, 5, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    ws = torch.randn(30, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    t_logits = torch.randn(2, 5, 30, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    teacher = top_k_teacher(t_logits[mask.bool()], k=8, temperature=1.5)
    got = chunked_divergence(name, hs, ws, teacher_sparse=teacher, mask=mask, temperature=1.5, chunk_size=chunk,
                             **params)
    g_got = torch.autograd.grad(got, (hs, ws))
    want = sparse_divergence(name, hs @ ws.T, teacher, mask, temperature=1.5, **params)
    g_want = torch.autograd.grad(want, (hs, ws))
    assert torch.allclose(got, want, atol=1e-12)
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-12)


def test_chunked_sparse_with_full_k_equals_chunked_dense():
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(3, 4, 5, generator=g).requires_grad_(True)
    ws = torch.randn(50, 5, generator=g).requires_grad_(True)
    t_logits = torch.randn(3, 4, 50, generator=g) * 2
    mask = torch.ones(3, 4, dtype=torch.long)
    dense = chunked_divergence("fkl", hs, ws, teacher_logits=t_logits, mask=mask, chunk_size=5)
    sparse = chunked_divergence("fkl", hs, ws, teacher_sparse=top_k_teacher(t_logits.reshape(-1, 50), 50),
                                mask=mask, chunk_size=5)
    assert abs(float(dense) - float(sparse)) < 1e-6


def test_student_logits_are_cut_to_the_teachers_vocabulary():
    s, t = _logits(v=30)
    padded = torch.cat([s, torch.full((s.shape[0], 2), 5.0, dtype=s.dtype)], dim=-1)  # two padding rows
    teacher = top_k_teacher(t, k=30)
    assert torch.allclose(sparse_divergence("fkl", padded, teacher), get_loss("fkl")(s, t), atol=1e-10)


def test_errors_name_the_mismatch():
    s, t = _logits()
    teacher = top_k_teacher(t, k=4, temperature=1.0)
    with pytest.raises(LossInputError, match="temperature 1.0"):
        sparse_divergence("fkl", s, teacher, temperature=2.0)
    with pytest.raises(LossInputError, match="positions"):
        sparse_divergence("fkl", s[:3], teacher)
    with pytest.raises(LossInputError, match=r"\[N, K\]"):
        SparseTeacher(teacher.ids, teacher.logprobs[:, :2], teacher.rest)
    with pytest.raises(LossInputError, match="vocabulary"):
        sparse_divergence("fkl", s[:, :10], teacher)
