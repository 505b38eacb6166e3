"""Token-level divergences: float64 brute-force references, gradcheck, properties, numerics, registry."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.errors import ConfigError
from lmdistill.losses import (
    LossInputError, forward_kl, get_loss, jsd, per_token_divergence, reverse_kl, sft_loss, skew_forward_kl,
    skew_reverse_kl, symmetric_kl, tvd)
from lmdistill.losses import vocab as vocab_mod

NAMES = ["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "symkl"]
FUNCS = {"fkl": forward_kl, "rkl": reverse_kl, "jsd": jsd, "tvd": tvd, "skl": skew_forward_kl,
         "srkl": skew_reverse_kl, "symkl": symmetric_kl}
PARAMS = {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.25}, "symkl": {"lam": 0.7}}


# ---------------------------------------------------------------- brute-force reference (pure Python floats)
def _softmax(row, t):
    xs = [x / t for x in row]
    m = max(xs)
    es = [math.exp(x - m) for x in xs]
    z = sum(es)
    return [e / z for e in es]


def _kl(a, b):
    return sum(ai * (math.log(ai) - math.log(bi)) for ai, bi in zip(a, b) if ai > 0)


def ref_token(name, s_row, t_row, t=1.0, **kw):
    q, p = _softmax(s_row, t), _softmax(t_row, t)
    if name == "fkl":
        return _kl(p, q)
    if name == "rkl":
        return _kl(q, p)
    if name == "jsd":
        b = kw.get("beta", 0.5)
        if b == 0:
            return _kl(p, q)
        if b == 1:
            return _kl(q, p)
        m = [b * pi + (1 - b) * qi for pi, qi in zip(p, q)]
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    if name == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
    if name == "skl":
        a = kw.get("alpha", 0.1)
        return _kl(p, [a * pi + (1 - a) * qi for pi, qi in zip(p, q)])
    if name == "srkl":
        a = kw.get("alpha", 0.1)
        return _kl(q, [a * qi + (1 - a) * pi for pi, qi in zip(p, q)])
    if name == "symkl":
        lam = kw.get("lam", 0.5)
        return (1 - lam) * _kl(p, q) + lam * _kl(q, p)
    raise AssertionError(name)


def ref_mean(name, s, t, mask=None, temp=1.0, **kw):
    s2 = s.reshape(-1, s.shape[-1]).tolist()
    t2 = t.reshape(-1, t.shape[-1]).tolist()
    m = [1] * len(s2) if mask is None else mask.reshape(-1).tolist()
    vals = [ref_token(name, a, b, temp, **kw) for a, b, k in zip(s2, t2, m) if k]
    return sum(vals) / len(vals)


def _pair(b=2, t=3, v=7, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, v, generator=g, dtype=dtype) * scale,
            torch.randn(b, t, v, generator=g, dtype=dtype) * scale)


# ---------------------------------------------------------------- values vs reference
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temp", [1.0, 0.5, 3.0])
def test_per_token_matches_brute_force(name, temp):
    s, t = _pair(seed=hash(name) % 100)
    got = per_token_divergence(name, s, t, temperature=temp, **PARAMS.get(name, {}))
    assert got.shape == (2, 3) and got.dtype == torch.float64
    for i in range(2):
        for j in range(3):
            want = ref_token(name, s[i, j].tolist(), t[i, j].tolist(), temp, **PARAMS.get(name, {}))
            assert got[i, j].item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_masked_mean_matches_brute_force(name):
    s, t = _pair(seed=3)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    got = FUNCS[name](s, t, mask, temperature=1.5, **PARAMS.get(name, {}))
    want = ref_mean(name, s, t, mask, 1.5, **PARAMS.get(name, {}))
    assert got.item() == pytest.approx(want, rel=1e-10)
    # no mask: mean over every position
    got_all = FUNCS[name](s, t, **PARAMS.get(name, {}))
    assert got_all.item() == pytest.approx(ref_mean(name, s, t, None, **PARAMS.get(name, {})), rel=1e-10)


def test_default_parameters_are_the_documented_ones():
    s, t = _pair(seed=4)
    assert jsd(s, t).item() == pytest.approx(ref_mean("jsd", s, t, beta=0.5), rel=1e-10)
    assert skew_forward_kl(s, t).item() == pytest.approx(ref_mean("skl", s, t, alpha=0.1), rel=1e-10)
    assert skew_reverse_kl(s, t).item() == pytest.approx(ref_mean("srkl", s, t, alpha=0.1), rel=1e-10)
    assert symmetric_kl(s, t).item() == pytest.approx(ref_mean("symkl", s, t, lam=0.5), rel=1e-10)


def test_sft_matches_brute_force_and_ignores_masked_and_minus_100():
    s, _ = _pair(seed=5)
    labels = torch.tensor([[1, 2, -100], [6, 0, 3]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    got = sft_loss(s, labels, mask)
    rows = [(0, 0), (0, 1), (1, 0), (1, 2)]
    want = sum(-math.log(_softmax(s[i, j].tolist(), 1.0)[labels[i, j]]) for i, j in rows) / 4
    assert got.item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(LossInputError, match="labels"):
        sft_loss(s, torch.tensor([[1, 2, 7], [0, 0, 0]]))
    with pytest.raises(LossInputError, match="shape"):
        sft_loss(s, torch.zeros(2, 2, dtype=torch.long))


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_student_and_teacher(name):
    s, t = _pair(b=1, t=2, v=5, seed=7, scale=1.0)
    s.requires_grad_(True)
    t.requires_grad_(True)
    mask = torch.tensor([[1, 1]])
    fn = FUNCS[name]
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, mask, temperature=1.7, **PARAMS.get(name, {})), (s, t))


def test_gradcheck_sft():
    s, _ = _pair(b=1, t=3, v=5, seed=8)
    s.requires_grad_(True)
    labels = torch.tensor([[0, 4, 2]])
    assert torch.autograd.gradcheck(lambda a: sft_loss(a, labels, temperature=0.7), (s,))


@pytest.mark.parametrize("name", ["fkl", "rkl"])
def test_kl_gradient_closed_form(name):
    # d KL(p||q)/dz = (q - p)/T (forward); reverse: q*(log q - log p - KL(q||p))/T
    s, t = _pair(b=1, t=1, v=6, seed=9)
    s.requires_grad_(True)
    temp = 2.0
    val = FUNCS[name](s, t, temperature=temp)
    (g,) = torch.autograd.grad(val, s)
    q, p = torch.softmax(s.detach() / temp, -1), torch.softmax(t / temp, -1)
    if name == "fkl":
        want = (q - p) / temp
    else:
        d = q.log() - p.log()
        want = q * (d - (q * d).sum(-1, keepdim=True)) / temp
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- properties
logit_rows = st.lists(st.floats(-20, 20, allow_nan=False, width=64), min_size=2, max_size=8)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), name=st.sampled_from(NAMES), param=st.floats(0.0, 1.0))
def test_nonnegative_and_zero_at_equality(data, name, param):
    row = data.draw(logit_rows)
    other = data.draw(st.lists(st.floats(-20, 20, allow_nan=False, width=64), min_size=len(row), max_size=len(row)))
    kw = {k: param for k in PARAMS.get(name, {})}
    s = torch.tensor([row], dtype=torch.float64)
    t = torch.tensor([other], dtype=torch.float64)
    assert per_token_divergence(name, s, t, **kw).item() >= -1e-12
    assert per_token_divergence(name, s, s.clone(), **kw).item() == pytest.approx(0.0, abs=1e-12)
    # a shift of all logits is the same distribution
    assert per_token_divergence(name, s, s + 3.5, **kw).item() == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_parameter_endpoints(seed):
    s, t = _pair(b=1, t=2, v=6, seed=seed)
    fkl, rkl = forward_kl(s, t), reverse_kl(s, t)
    torch.testing.assert_close(jsd(s, t, beta=0.0), fkl, rtol=0, atol=0)
    torch.testing.assert_close(jsd(s, t, beta=1.0), rkl, rtol=0, atol=0)
    torch.testing.assert_close(skew_forward_kl(s, t, alpha=0.0), fkl, rtol=0, atol=0)
    torch.testing.assert_close(skew_reverse_kl(s, t, alpha=0.0), rkl, rtol=0, atol=0)
    assert skew_forward_kl(s, t, alpha=1.0).item() == 0.0
    assert skew_reverse_kl(s, t, alpha=1.0).item() == 0.0
    torch.testing.assert_close(symmetric_kl(s, t, lam=0.0), fkl)
    torch.testing.assert_close(symmetric_kl(s, t, lam=1.0), rkl)
    # skew KL approaches the plain KL continuously: per token, with r = p/q,
    # 0 <= KL(p||q) - KL(p||alpha p + (1-alpha) q) = E_p[log(1 + alpha (r - 1))] <= alpha * chi2(p||q)
    p, q = t.softmax(-1), s.softmax(-1)
    chi2 = (p * p / q).sum(-1) - 1
    fkl_tok = per_token_divergence("fkl", s, t)
    for alpha in (1e-7, 1e-4, 1e-2):
        gap = fkl_tok - per_token_divergence("skl", s, t, alpha=alpha)
        assert (gap >= -1e-12).all() and (gap <= alpha * chi2 * (1 + 1e-9) + 1e-12).all()
    # jsd(beta) and jsd(1-beta) swap the roles of teacher and student
    torch.testing.assert_close(jsd(s, t, beta=0.3), jsd(t, s, beta=0.7))


@settings(max_examples=30, deadline=None)
@given(data=st.data(), name=st.sampled_from(NAMES))
def test_mask_invariance_padding_never_changes_value(data, name):
    b, t, v = 2, 4, 5
    seed = data.draw(st.integers(0, 1000))
    s, te = _pair(b, t, v, seed=seed)
    mask = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 1), min_size=t, max_size=t),
                                           min_size=b, max_size=b)))
    if mask.sum() == 0:
        mask[0, 0] = 1
    garbage = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30]))
    s2, te2 = s.clone(), te.clone()
    s2[mask == 0] = garbage
    te2[mask == 0] = -garbage
    s.requires_grad_(True)
    s2.requires_grad_(True)
    fn = FUNCS[name]
    a, b_ = fn(s, te, mask), fn(s2, te2, mask)
    assert a.item() == b_.item()
    (ga,) = torch.autograd.grad(a, s)
    (gb,) = torch.autograd.grad(b_, s2)
    assert torch.equal(ga, gb)
    assert torch.all(gb[mask == 0] == 0)


def test_empty_mask_gives_zero_with_graph():
    s, t = _pair()
    s[0, 0, 0] = t[0, 0, 0] = -float("inf")
    s.requires_grad_(True)
    val = jsd(s, t, torch.zeros(2, 3))
    assert val.item() == 0.0
    val.backward()
    assert torch.all(s.grad == 0)


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_neg_inf_logits_in_both_models_equal_reduced_vocab(name, dtype):
    s, t = _pair(v=8, seed=11, dtype=dtype)
    s[..., [2, 5]] = -float("inf")
    t[..., [2, 5]] = -float("inf")
    s.requires_grad_(True)
    t.requires_grad_(True)
    val = FUNCS[name](s, t, temperature=0.8, **PARAMS.get(name, {}))
    gs, gt = torch.autograd.grad(val, (s, t))
    assert torch.isfinite(val) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    keep = [0, 1, 3, 4, 6, 7]
    want = ref_mean(name, s.detach()[..., keep].double(), t.detach()[..., keep].double(), temp=0.8,
                    **PARAMS.get(name, {}))
    assert val.item() == pytest.approx(want, rel=1e-5 if dtype == torch.float32 else 1e-10)
    assert torch.all(gs[..., [2, 5]] == 0)


@pytest.mark.parametrize("name", NAMES)
def test_neg_inf_in_one_model_only_is_finite(name):
    s, t = _pair(v=6, seed=12, dtype=torch.float32)
    s[..., 1] = -float("inf")  # student rules out a class the teacher supports: KL(p||q) is "infinite"
    t[..., 4] = -float("inf")
    s.requires_grad_(True)
    val = FUNCS[name](s, t, **PARAMS.get(name, {}))
    (g,) = torch.autograd.grad(val, s)
    assert torch.isfinite(val) and val.item() >= 0 and torch.isfinite(g).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temp", [1e-4, 1e4])
def test_extreme_temperatures_finite(name, temp):
    s, t = _pair(v=10, seed=13, scale=30.0, dtype=torch.float32)
    s.requires_grad_(True)
    val = FUNCS[name](s, t, temperature=temp, **PARAMS.get(name, {}))
    (g,) = torch.autograd.grad(val, s)
    assert torch.isfinite(val) and val.item() >= -1e-6 and torch.isfinite(g).all()
    if temp == 1e4:  # near-uniform distributions
        assert val.item() < 1e-2


def test_half_precision_inputs_are_computed_in_float32():
    s, t = _pair(dtype=torch.float64)
    got = forward_kl(s.to(torch.bfloat16), t.to(torch.bfloat16))
    assert got.dtype == torch.float32
    want = ref_mean("fkl", s.to(torch.bfloat16).double(), t.to(torch.bfloat16).double())
    assert got.item() == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------- vocab mismatch
def test_padded_teacher_is_compared_on_prefix_with_one_warning(monkeypatch):
    monkeypatch.setattr(vocab_mod, "_warned", set())
    s, t = _pair(v=6, seed=14)
    pad = torch.randn(2, 3, 4, dtype=torch.float64) * 5
    with pytest.warns(UserWarning, match="padding"):
        got = forward_kl(s, torch.cat([t, pad], -1))
    assert got.item() == pytest.approx(ref_mean("fkl", s, t), rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # second call: no warning
        again = forward_kl(s, torch.cat([t, pad], -1))
    assert again.item() == got.item()


def test_padded_student_is_compared_on_prefix(monkeypatch):
    monkeypatch.setattr(vocab_mod, "_warned", set())
    s, t = _pair(v=6, seed=15)
    with pytest.warns(UserWarning, match="student's extra rows"):
        got = per_token_divergence("rkl", torch.cat([s, torch.zeros(2, 3, 2, dtype=s.dtype)], -1), t)
    for i in range(2):
        for j in range(3):
            assert got[i, j].item() == pytest.approx(ref_token("rkl", s[i, j].tolist(), t[i, j].tolist()))


def test_padding_rule_with_and_without_tokenizer_length(monkeypatch):
    monkeypatch.setattr(vocab_mod, "_warned", set())
    s = torch.randn(1, 2, 10)
    t = torch.randn(1, 2, 10 + vocab_mod.MAX_VOCAB_PADDING + 1)
    with pytest.raises(LossInputError, match="not padding"):
        forward_kl(s, t)
    # with the tokenizer length the size of the gap does not matter, only that the prefix covers it
    with pytest.warns(UserWarning):
        assert torch.isfinite(forward_kl(s, t, vocab_size=10))
    with pytest.raises(LossInputError, match="tokenizer has 12"):
        forward_kl(s, torch.randn(1, 2, 11), vocab_size=12)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(LossInputError, match="differ outside the vocabulary"):
        jsd(torch.randn(2, 3, 5), torch.randn(2, 4, 5))
    with pytest.raises(LossInputError, match="mask shape"):
        jsd(torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.ones(2, 4))
    with pytest.raises(LossInputError, match="0 and 1"):
        jsd(torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.full((2, 3), 0.5))


# ---------------------------------------------------------------- registry and parameters
def test_get_loss_binds_parameters_and_names():
    s, t = _pair(seed=16)
    assert get_loss("jsd", beta=0.9)(s, t).item() == pytest.approx(ref_mean("jsd", s, t, beta=0.9), rel=1e-10)
    assert get_loss("forward_kl")(s, t).item() == forward_kl(s, t).item()
    assert get_loss("skl", alpha=0.3, temperature=2.0)(s, t).item() == pytest.approx(
        ref_mean("skl", s, t, temp=2.0, alpha=0.3), rel=1e-10)
    labels = torch.zeros(2, 3, dtype=torch.long)
    assert get_loss("sft")(s, labels).item() == sft_loss(s, labels).item()


def test_get_loss_errors_name_the_valid_choices():
    with pytest.raises(ConfigError, match="valid: .*fkl.*jsd.*sft"):
        get_loss("kl")
    with pytest.raises(ConfigError, match="valid: .*beta"):
        get_loss("jsd", alpha=0.1)
    with pytest.raises(ConfigError, match="valid: .*none|valid: temperature"):
        get_loss("fkl", beta=0.1)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        get_loss("skl", alpha=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        get_loss("jsd", temperature=0)
    with pytest.raises(ConfigError, match="unknown divergence"):
        per_token_divergence("kl", torch.randn(3), torch.randn(3))


def test_matches_trl_generalized_jsd():
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    s, t = _pair(b=2, t=4, v=9, seed=17, dtype=torch.float32)
    labels = torch.tensor([[-100, 1, 2, 3], [4, 5, -100, -100]])
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        theirs = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=1.3)
        ours = jsd(s, t, labels != -100, beta=beta, temperature=1.3)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
