"""The sorts of the sorted-L1 distance (``losses/aligned.py`` ``descending``): the teacher's side (no gradients, CPU)
through NumPy, the same values as ``torch.sort``; the student's side (gradients) through ``torch.sort`` itself."""

from __future__ import annotations

import pytest
import torch

from lmdistill.losses.aligned import descending, sorted_l1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 1), (5, 300), (2, 49152)])
def test_descending_values_equal_torch_sort_with_ties(dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(shape, generator=g).softmax(-1).to(dtype)
    x[:, ::7] = x[:, :1].clone()   # ties
    got = descending(x)
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, x.sort(dim=-1, descending=True).values)
    assert torch.equal(descending(x[:, ::2]), x[:, ::2].sort(dim=-1, descending=True).values)   # a strided view


def test_with_gradients_the_order_and_the_subgradient_are_torch_sorts():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 500, generator=g, dtype=torch.float64).softmax(-1).requires_grad_(True)
    p = torch.randn(4, 700, generator=g, dtype=torch.float64).softmax(-1)
    got = sorted_l1(q, p)
    a, b = q.sort(-1, descending=True).values, p.sort(-1, descending=True).values
    want = (a - b[:, :500]).abs().sum(-1) + b[:, 500:].sum(-1)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    (gq,) = torch.autograd.grad(got.sum(), q)
    (wq,) = torch.autograd.grad(want.sum(), q)
    assert torch.equal(gq, wq) and gq.abs().sum() > 0
