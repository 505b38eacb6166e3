"""Chunked path: same values and gradients as the direct path, and only chunk-sized vocab tensors."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmdistill.errors import ConfigError
from lmdistill.losses import LossInputError, chunked_divergence, get_loss, sft_loss
from lmdistill.losses import chunk_kernels
from lmdistill.losses import vocab as vocab_mod

CASES = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}),
         ("jsd", {"beta": 0.2}), ("tvd", {}), ("skl", {"alpha": 0.1}), ("srkl", {"alpha": 0.3}), ("symkl", {"lam": 0.9})]


def _setup(b=2, t=5, h=6, v=40, v_t=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(b, t, h, generator=g, dtype=dtype).requires_grad_(True)
    ws = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_(True)
    ht = torch.randn(b, t, h + 2, generator=g, dtype=dtype)
    wt = torch.randn(v_t or v, h + 2, generator=g, dtype=dtype)
    return hs, ws, ht, wt


def _direct(name, hs, ws, t_logits, mask, temp, params):
    return get_loss(name, **params)(hs @ ws.T, t_logits, mask, temperature=temp)


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("chunk", [3, 64])
def test_chunked_equals_direct_values_and_grads(name, params, chunk):
    hs, ws, ht, wt = _setup(seed=chunk)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    t_logits = ht @ wt.T
    for teacher in ("logits", "hidden"):
        kw = {"teacher_logits": t_logits} if teacher == "logits" else {"teacher_hidden": ht, "teacher_head_weight": wt}
        got = chunked_divergence(name, hs, ws, mask=mask, temperature=1.7, chunk_size=chunk, **kw, **params)
        g_got = torch.autograd.grad(got, (hs, ws))
        want = _direct(name, hs, ws, t_logits, mask, 1.7, params)
        g_want = torch.autograd.grad(want, (hs, ws))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("chunk", [1, 100])
def test_chunked_sft_equals_direct(chunk):
    hs, ws, _, _ = _setup(seed=3)
    labels = torch.tensor([[1, 2, -100, 4, 5], [6, 7, 8, 9, 39]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    got = chunked_divergence("sft", hs, ws, labels=labels, mask=mask, chunk_size=chunk)
    want = sft_loss(hs @ ws.T, labels, mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(torch.autograd.grad(got, (hs, ws)), torch.autograd.grad(want, (hs, ws))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name,params", [("jsd", {"beta": 0.4}), ("tvd", {}), ("srkl", {"alpha": 0.2})])
def test_chunked_gradcheck(name, params):
    hs, ws, ht, wt = _setup(b=1, t=3, h=3, v=7, seed=5)
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_divergence(name, h, w, teacher_hidden=ht, teacher_head_weight=wt, chunk_size=2,
                                        temperature=0.9, **params), (hs, ws))


def test_chunked_vocab_padding_both_ways(monkeypatch):
    monkeypatch.setattr(vocab_mod, "_warned", set())
    hs, ws, ht, wt = _setup(v=40, v_t=48, seed=6)
    t_logits = ht @ wt.T
    with pytest.warns(UserWarning, match="teacher's extra rows"):
        got = chunked_divergence("fkl", hs, ws, t_logits, chunk_size=4)
    want = get_loss("fkl")(hs @ ws.T, t_logits[..., :40])
    torch.testing.assert_close(got, want)
    # student padded: its extra head rows get exactly zero gradient
    hs2, ws2, ht2, wt2 = _setup(v=48, v_t=40, seed=7)
    with pytest.warns(UserWarning, match="student's extra rows"):
        got = chunked_divergence("rkl", hs2, ws2, teacher_hidden=ht2, teacher_head_weight=wt2, chunk_size=4)
    (gw,) = torch.autograd.grad(got, ws2)
    assert torch.all(gw[40:] == 0) and gw[:40].abs().sum() > 0
    want = get_loss("rkl")((hs2 @ ws2.T)[..., :40], ht2 @ wt2.T)
    torch.testing.assert_close(got, want)


def test_chunked_float32_close_to_float64():
    hs, ws, ht, wt = _setup(seed=8)
    ref = chunked_divergence("jsd", hs, ws, teacher_hidden=ht, teacher_head_weight=wt)
    got = chunked_divergence("jsd", hs.float(), ws.float(), teacher_hidden=ht.float(), teacher_head_weight=wt.float())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_chunked_bfloat16_matches_direct_bfloat16():
    hs, ws, ht, wt = _setup(seed=9, dtype=torch.bfloat16)
    t_logits = ht @ wt.T
    got = chunked_divergence("fkl", hs, ws, t_logits, chunk_size=3)
    want = get_loss("fkl")(hs @ ws.T, t_logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(got, (hs, ws))
    gb = torch.autograd.grad(want, (hs, ws))
    for a, b in zip(ga, gb):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-3)


def test_empty_mask_is_zero_with_zero_grads():
    hs, ws, ht, wt = _setup(seed=10)
    got = chunked_divergence("fkl", hs, ws, teacher_hidden=ht, teacher_head_weight=wt, mask=torch.zeros(2, 5))
    got.backward()
    assert got.item() == 0.0 and torch.all(hs.grad == 0) and torch.all(ws.grad == 0)


class _LargestTensor(TorchDispatchMode):
    """Largest number of elements of any tensor an op writes into new memory (views of inputs excluded)."""

    def __init__(self, *existing):
        super().__init__()
        self.largest = 0
        self.existing = {t.untyped_storage().data_ptr() for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in self.existing:
                self.largest = max(self.largest, o.numel())
        return out


@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_no_tensor_larger_than_one_chunk_in_forward_and_backward(teacher):
    n_tok, h, v, chunk = 64, 4, 300, 8  # n_tok * v = 19200 >> chunk * v = 2400 > v * h = 1200
    g = torch.Generator().manual_seed(11)
    hs = torch.randn(1, n_tok, h, generator=g).requires_grad_(True)
    ws = torch.randn(v, h, generator=g).requires_grad_(True)
    ht, wt = torch.randn(1, n_tok, h, generator=g), torch.randn(v, h, generator=g)
    t_logits = (ht @ wt.T) if teacher == "logits" else None
    kw = {"teacher_logits": t_logits} if teacher == "logits" else {"teacher_hidden": ht, "teacher_head_weight": wt}
    mode = _LargestTensor(*(x for x in (hs, ws, ht, wt, t_logits) if x is not None))
    with mode:
        loss = chunked_divergence("jsd", hs, ws, chunk_size=chunk, **kw)
        loss.backward()
    assert mode.largest <= chunk * v
    # the direct path does create token x vocab tensors (the check can fail)
    mode2 = _LargestTensor()
    with mode2:
        get_loss("jsd")(hs @ ws.T, ht @ wt.T).backward()
    assert mode2.largest >= n_tok * v


def test_chunked_input_errors():
    hs, ws, ht, wt = _setup()
    with pytest.raises(LossInputError, match="one of teacher_logits, teacher_hidden"):
        chunked_divergence("fkl", hs, ws)
    with pytest.raises(LossInputError, match="give one of"):
        chunked_divergence("fkl", hs, ws, ht @ wt.T, teacher_hidden=ht, teacher_head_weight=wt)
    with pytest.raises(LossInputError, match="labels"):
        chunked_divergence("sft", hs, ws)
    with pytest.raises(LossInputError, match="differ outside"):
        chunked_divergence("fkl", hs, ws, torch.randn(2, 4, 40))
    with pytest.raises(LossInputError, match="hidden size"):
        chunked_divergence("fkl", hs, torch.randn(40, 5), ht @ wt.T)
    with pytest.raises(ConfigError, match="chunk_size"):
        chunked_divergence("fkl", hs, ws, ht @ wt.T, chunk_size=0)
    with pytest.raises(ConfigError, match="valid: beta"):
        chunked_divergence("jsd", hs, ws, ht @ wt.T, alpha=0.1)
    with pytest.raises(LossInputError, match="labels must be in"):
        chunked_divergence("sft", hs, ws, labels=torch.full((2, 5), 40))


def test_chunked_scales_with_upstream_gradient():
    hs, ws, ht, wt = _setup(seed=12)
    loss = chunked_divergence("skl", hs, ws, teacher_hidden=ht, teacher_head_weight=wt, chunk_size=4)
    g1 = torch.autograd.grad(loss, (hs, ws), retain_graph=True)
    g3 = torch.autograd.grad(-3.0 * loss, (hs, ws))
    for a, b in zip(g1, g3):
        torch.testing.assert_close(b, -3.0 * a)


@pytest.mark.parametrize("name,params", CASES + [("skl", {"alpha": 1.0}), ("srkl", {"alpha": 0.0})])
def test_chunked_with_neg_inf_teacher_logits(name, params):
    hs, ws, ht, wt = _setup(seed=13)
    t_logits = ht @ wt.T
    t_logits[..., [0, 7, 30]] = -float("inf")  # vocabulary entries the teacher masks out
    got = chunked_divergence(name, hs, ws, t_logits, chunk_size=4, temperature=0.7, **params)
    g_got = torch.autograd.grad(got, (hs, ws))
    want = _direct(name, hs, ws, t_logits, None, 0.7, params)
    g_want = torch.autograd.grad(want, (hs, ws))
    assert torch.isfinite(got) and all(torch.isfinite(g).all() for g in g_got)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.slow
@pytest.mark.parametrize("name,params", [("jsd", {"beta": 0.5}), ("srkl", {"alpha": 0.1})])
def test_chunked_compiled_kernel_equals_direct(name, params):
    hs, ws, ht, wt = _setup(seed=14, dtype=torch.float32)
    got = chunked_divergence(name, hs, ws, teacher_hidden=ht, teacher_head_weight=wt, chunk_size=4, compile=True,
                             **params)
    g_got = torch.autograd.grad(got, (hs, ws))
    want = _direct(name, hs, ws, ht @ wt.T, None, 1.0, params)
    g_want = torch.autograd.grad(want, (hs, ws))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,params", CASES)
def test_kernel_on_row_tiles_with_workspace_equals_direct(name, params, monkeypatch):
    """chunked_divergence runs the closed-form kernel on row tiles of each chunk with reused scratch buffers: a
    2-row tile inside 5-row chunks (and a last, shorter tile and chunk) gives the direct path's values and grads."""
    monkeypatch.setattr(chunk_kernels, "TILE_ELEMENTS", 2 * 40)
    assert chunk_kernels.kernel_tile_rows(40) == 2
    hs, ws, ht, wt = _setup(b=2, t=7, seed=15)
    t_logits = ht @ wt.T
    t_logits[..., 3] = -float("inf")
    got = chunked_divergence(name, hs, ws, t_logits, chunk_size=5, temperature=1.3, **params)
    want = _direct(name, hs, ws, t_logits, None, 1.3, params)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(torch.autograd.grad(got, (hs, ws)), torch.autograd.grad(want, (hs, ws))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_workspace_reuses_its_buffers():
    ws = chunk_kernels.Workspace()
    a = ws.get("q", torch.empty(4, 10))
    b = ws.get("q", torch.empty(2, 10))  # smaller: a view of the same memory
    assert b.shape == (2, 10) and b.data_ptr() == a.data_ptr()
    c = ws.get("q", torch.empty(5, 10, dtype=torch.float64))  # other dtype or larger: a new buffer
    assert c.dtype == torch.float64 and c.shape == (5, 10)


@pytest.mark.parametrize("name,params,dtype", [("jsd", {"beta": 0.3}, torch.float64),
                                               ("jsd", {"beta": 0.3}, torch.float32),
                                               ("tvd", {}, torch.float32), ("skl", {"alpha": 0.1}, torch.float32),
                                               ("srkl", {"alpha": 0.1}, torch.float32)])
def test_chunked_compiled_kernel_small_parity(name, params, dtype):
    """compile=True (torch.compile of the same kernel) at a small size, float64 and float32, on one thread (as
    conftest sets): the divergences whose kernels write into ``out=`` buffers. Compiled with dynamic shapes,
    inductor (torch 2.13) returned wrong values here (jsd 0.693 for 0.460); this caught it."""
    hs, ws, ht, wt = _setup(seed=16, dtype=dtype)
    got = chunked_divergence(name, hs, ws, teacher_hidden=ht, teacher_head_weight=wt, chunk_size=4, compile=True,
                             **params)
    want = _direct(name, hs, ws, ht @ wt.T, None, 1.0, params)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)
    gtol = dict(rtol=1e-10, atol=1e-13) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, (hs, ws)), torch.autograd.grad(want, (hs, ws))):
        torch.testing.assert_close(a, b, **gtol)
