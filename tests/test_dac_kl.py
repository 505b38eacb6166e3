"""DAC-KL: brute-force reference with fixed bounds, gradients, training keeps a non-trivial set."""

from __future__ import annotations

import math

import pytest
import torch

from lmdistill.errors import ConfigError
from lmdistill.losses import forward_kl
from lmdistill.losses.dac_kl import DACKL


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    z = sum(e)
    return [x / z for x in e]


def ref_dackl(s_row, t_row, lo, hi, k, rest_bin=True, floor=0.0, weight=1.0):
    p, q = _softmax(t_row), _softmax(s_row)
    order = sorted(range(len(p)), key=lambda i: -p[i])[:k]
    kept, c = [], 0.0
    for rank, i in enumerate(order):
        start, c = c, c + p[i]
        if rank == 0 or (start < hi and c > lo):
            kept.append(i)
    pk, qk = sum(p[i] for i in kept), sum(q[i] for i in kept)
    if rest_bin:
        kl = sum(p[i] * math.log(p[i] / q[i]) for i in kept)
        pr, qr = 1 - pk, 1 - qk
        if pr > 0:
            kl += pr * math.log(pr / qr)
    else:
        kl = sum(p[i] / pk * math.log((p[i] / pk) / (q[i] / qk)) for i in kept)
    return kl + weight * max(0.0, floor - pk), len(kept)


def _pair(n=6, v=12, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale,
            torch.randn(n, v, generator=g, dtype=torch.float64) * scale)


@pytest.mark.parametrize("rest_bin", [True, False])
@pytest.mark.parametrize("bounds,k", [((0.1, 0.7), 12), ((0.3, 0.9), 5), ((0.0, 0.2), 12)])
def test_fixed_bounds_match_brute_force(rest_bin, bounds, k):
    s, t = _pair(seed=k)
    loss = DACKL(top_k=k, fixed_bounds=bounds, rest_bin=rest_bin, coverage_floor=0.8, coverage_weight=2.5)
    got = loss(s, t)
    refs = [ref_dackl(s[i].tolist(), t[i].tolist(), *bounds, k, rest_bin, floor=0.8, weight=2.5)
            for i in range(s.shape[0])]
    assert got.item() == pytest.approx(sum(r[0] for r in refs) / len(refs), rel=1e-10)
    assert loss.last_stats["kept_classes"] == pytest.approx(sum(r[1] for r in refs) / len(refs))
    assert list(loss.parameters()) == []


def test_full_bounds_with_rest_bin_is_forward_kl():
    s, t = _pair(seed=1)
    got = DACKL(top_k=12, fixed_bounds=(0.0, 1.0), coverage_floor=0.0)(s, t)
    torch.testing.assert_close(got, forward_kl(s, t), rtol=1e-10, atol=1e-12)


def test_tight_bounds_keep_the_argmax_only():
    s, t = _pair(seed=2)
    loss = DACKL(top_k=12, fixed_bounds=(0.999, 1.0), coverage_floor=0.0)
    loss(s, t)
    # an interval (c_{k-1}, c_k) reaching past 0.999 is the last one(s); plus the argmax
    assert 1 <= loss.last_stats["kept_classes"] <= 3


def test_gradcheck_student_logits_fixed_bounds():
    s, t = _pair(n=2, v=6, seed=3, scale=1.0)
    s.requires_grad_(True)
    for rest_bin in (True, False):
        m = DACKL(top_k=6, fixed_bounds=(0.1, 0.8), rest_bin=rest_bin)
        assert torch.autograd.gradcheck(lambda x: m(x, t), (s,))


def test_fsub_receives_finite_gradients_and_saves_in_state_dict():
    s, t = _pair(n=8, v=40, seed=4)
    m = DACKL(top_k=16, hidden_size=8).double()
    loss = m(s, t)
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    keys = set(m.state_dict())
    assert {"f_sub.0.weight", "f_sub.0.bias", "f_sub.2.weight", "f_sub.2.bias"} <= keys
    m2 = DACKL(top_k=16, hidden_size=8).double()
    m2.load_state_dict(m.state_dict())
    assert m2(s, t).item() == loss.item()


def test_training_keeps_a_nontrivial_set():
    torch.manual_seed(0)
    n, v = 32, 200
    teacher = torch.randn(n, v) * 3.0
    student = torch.nn.Parameter(torch.randn(n, v))
    m = DACKL(top_k=64, hidden_size=16, coverage_floor=0.8)
    opt = torch.optim.Adam([student, *m.parameters()], lr=0.05)
    first = None
    w0 = m.f_sub[2].weight.detach().clone()
    for _ in range(60):
        opt.zero_grad()
        loss = m(student, teacher)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    stats = m.last_stats
    assert loss.item() < first
    assert not torch.equal(w0, m.f_sub[2].weight)
    assert stats["kept_classes"] > 2.0  # more than the argmax
    assert stats["coverage"] > 0.6  # the floor keeps the retained mass up
    assert 0.0 <= stats["lower"] < stats["upper"] <= 1.0


def test_neg_inf_logits_and_mask_invariance():
    s, t = _pair(n=6, v=12, seed=5)
    s[:, 3] = t[:, 3] = -float("inf")
    s.requires_grad_(True)
    m = DACKL(top_k=8, hidden_size=4).double()
    mask = torch.tensor([1, 1, 0, 1, 0, 1])
    val = m(s, t, mask)
    (g,) = torch.autograd.grad(val, s)
    assert torch.isfinite(val) and torch.isfinite(g).all() and torch.all(g[mask == 0] == 0)
    s2, t2 = s.detach().clone(), t.clone()
    s2[mask == 0] = float("nan")
    t2[mask == 0] = 7.0
    assert m(s2, t2, mask).item() == val.item()
    assert m(s, t, torch.zeros(6)).item() == 0.0


def test_config_errors():
    with pytest.raises(ConfigError, match="l < u"):
        DACKL(fixed_bounds=(0.5, 0.4))
    with pytest.raises(ConfigError, match="top_k"):
        DACKL(top_k=0)
    with pytest.raises(ConfigError, match="coverage_floor"):
        DACKL(coverage_floor=1.5)
