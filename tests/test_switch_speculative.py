"""SWITCH with speculative verification (``generation/speculative.py``) against the one-step-per-token loop.

Identity is asserted in float64: there a multi-token teacher forward and single steps agree to the last bit that
matters, so tokens, sources, lengths and the JSD trace must be equal. In float32 they round differently (the
module docstring); ``test_float32_mostly_agrees`` only checks that this rarely changes a token.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.errors import ConfigError
from lmdistill.generation import SamplingConfig, generate
from lmdistill.generation.engine import pad_left
from lmdistill.generation.policies.switch import SwitchParams
from lmdistill.generation.runner import CachedLM
from lmdistill.generation.speculative import DraftLength

N = 20


@pytest.fixture(scope="module")
def f64(models):
    return {k: copy.deepcopy(models[k]).double() for k in ("student", "teacher")}


@pytest.fixture(scope="module")
def jsd_values(f64, tokenizer, prompts):
    """The sorted JSDs along student-only samples: thresholds at their quantiles set how often the teacher writes."""
    probe = generate(f64["student"], prompts, "switch", teacher=f64["teacher"], pad_id=tokenizer.pad_token_id,
                     config=SamplingConfig(max_new_tokens=N, seed=0),
                     params=SwitchParams(tau0=math.inf, draft_tokens=0))
    return sorted(x for s in probe.stats for x in s["jsd"])


def both(ms, prompts, cfg, params, pad_id, eos_id, k_max=5, k_min=1):
    """``(stepwise, speculative)`` outputs of the same run (sampling ``cfg``, SWITCH ``params``)."""
    def go(p):
        return generate(ms["student"], prompts, "switch", teacher=ms["teacher"], config=cfg, params=p, pad_id=pad_id,
                        eos_id=eos_id)
    return (go(replace(params, draft_tokens=0)),
            go(replace(params, draft_tokens=k_max, draft_min=k_min)))


def assert_same(a, b):
    assert a.responses == b.responses
    assert torch.equal(a.sources, b.sources) and torch.equal(a.input_ids, b.input_ids)
    for x, y in zip(a.stats, b.stats):
        assert {k: v for k, v in x.items() if not k.endswith("_forwards")} == \
               {k: v for k, v in y.items() if not k.endswith("_forwards")}  # jsd trace exactly, lengths, finished
        assert y["teacher_forwards"] <= x["length"] + 1  # at worst one extra pass (a row ending at offset 0)


def mid_run_eos(ms, prompts, cfg, params, pad_id, row, at):
    """An EOS id that ends ``row`` at or before position ``at``: its token there in a run without EOS."""
    out = generate(ms["student"], prompts, "switch", teacher=ms["teacher"], pad_id=pad_id, eos_id=None,
                   config=cfg, params=replace(params, draft_tokens=0))
    return out.responses[row][at]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("share", [0.05, 0.5, 0.95])  # quantile of the JSD: takeovers frequent / half / rare
@pytest.mark.parametrize("mode", ["sampled", "greedy", "ban", "topk"])
def test_speculative_equals_stepwise_float64(f64, tokenizer, prompts, jsd_values, batch, share, mode):
    extra = {"sampled": {}, "greedy": dict(do_sample=False), "ban": dict(no_repeat_ngram_size=2),
             "topk": dict(temperature=0.7, top_k=40, no_repeat_ngram_size=1)}[mode]
    tau0 = jsd_values[int(share * (len(jsd_values) - 1))]
    ps = prompts[:batch]
    pad = tokenizer.pad_token_id
    for seed in (0, 1):
        cfg, params = SamplingConfig(max_new_tokens=N, seed=seed, **extra), SwitchParams(tau0=tau0, decay=0.002)
        for eos in (None, mid_run_eos(f64, ps, cfg, params, pad, row=seed % batch, at=3 + 4 * seed)):
            a, b = both(f64, ps, cfg, params, pad, eos)
            assert_same(a, b)
            if eos is not None:
                assert a.stats[seed % batch]["finished"] and a.stats[seed % batch]["length"] <= 4 + 4 * seed


@pytest.mark.parametrize("decoder", ["fast", "hf"])
def test_speculative_equals_stepwise_with_rows_leaving(f64, tokenizer, prompts, jsd_values, decoder):
    """EOS ends rows at different positions (the fast decoder moves them out of the batch, the HF one keeps them)."""
    tau0 = jsd_values[len(jsd_values) // 2]
    cfg, params = SamplingConfig(max_new_tokens=N, seed=3, decoder=decoder), SwitchParams(tau0=tau0, decay=0.002)
    pad = tokenizer.pad_token_id
    free = generate(f64["student"], prompts, "switch", teacher=f64["teacher"], pad_id=pad, eos_id=None,
                    config=cfg, params=replace(params, draft_tokens=0))
    for b, at in ((1, 2), (2, 9), (0, 14)):
        a, s = both(f64, prompts, cfg, params, pad, free.responses[b][at], k_max=6)
        assert_same(a, s)
        assert a.stats[b]["finished"]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), share=st.floats(0.0, 1.0), k_max=st.integers(1, 8), k_min=st.integers(1, 8),
       batch=st.integers(1, 4), eos_at=st.one_of(st.none(), st.integers(0, N - 1)), ngram=st.sampled_from([0, 0, 2, 3]),
       greedy=st.booleans(), decay=st.sampled_from([0.0, 0.01, 0.1]))
def test_speculative_equals_stepwise_hypothesis(f64, tokenizer, prompts, jsd_values, seed, share, k_max, k_min,
                                                batch, eos_at, ngram, greedy, decay):
    tau0 = jsd_values[int(share * (len(jsd_values) - 1))]
    ps = prompts[:batch]
    cfg = SamplingConfig(max_new_tokens=N, seed=seed, no_repeat_ngram_size=ngram, do_sample=not greedy)
    params = SwitchParams(tau0=tau0, decay=decay)
    pad = tokenizer.pad_token_id
    eos = None if eos_at is None else mid_run_eos(f64, ps, cfg, params, pad, row=seed % batch, at=eos_at)
    a, b = both(f64, ps, cfg, params, pad, eos, k_max=k_max, k_min=min(k_min, k_max))
    assert_same(a, b)


def test_teacher_forwards_counted(f64, tokenizer, prompts):
    """Without takeovers the draft stays at k_max: one teacher pass per 4 tokens (plus the prefill), and the
    student's passes are stepwise's (4 per round, none after the last)."""
    cfg, params = SamplingConfig(max_new_tokens=24, seed=0), SwitchParams(tau0=math.inf)
    a, b = both(f64, prompts, cfg, params, tokenizer.pad_token_id, None, k_max=4)
    assert_same(a, b)
    assert [s["teacher_forwards"] for s in a.stats] == [24] * 4 and [s["student_forwards"] for s in a.stats] == [24] * 4
    assert [s["teacher_forwards"] for s in b.stats] == [1 + 6] * 4
    assert [s["student_forwards"] for s in b.stats] == [24] * 4
    # the teacher always writes: every round fires at offset 0, the first one costs no teacher pass beyond the prefill
    a, b = both(f64, prompts, cfg, replace(params, tau0=-1.0), tokenizer.pad_token_id, None, k_max=4)
    assert_same(a, b)
    assert [s["teacher_forwards"] for s in b.stats] == [24] * 4
    assert all(s["teacher_tokens"] == 24 for s in b.stats)


def test_extremes_reproduce_student_and_teacher_policies(f64, tokenizer, prompts):
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    cfg = SamplingConfig(max_new_tokens=N, seed=5)
    for tau0, policy in ((math.inf, "student"), (-1.0, "teacher")):
        ref = generate(f64["student"], prompts, policy, teacher=f64["teacher"], config=cfg, pad_id=pad, eos_id=eos)
        out = generate(f64["student"], prompts, "switch", teacher=f64["teacher"], pad_id=pad, eos_id=eos,
                       config=cfg, params=SwitchParams(tau0=tau0, draft_tokens=3))
        assert out.responses == ref.responses


def test_float32_mostly_agrees(models, tokenizer, prompts):
    """float32: the multi-token forward rounds differently, so a token can differ (rarely); the trace stays close."""
    probe = generate(models["student"], prompts, "switch", teacher=models["teacher"], pad_id=tokenizer.pad_token_id,
                     config=SamplingConfig(max_new_tokens=N, seed=0), params={"tau0": math.inf})
    values = sorted(x for s in probe.stats for x in s["jsd"])
    same = total = 0
    for seed in range(4):
        cfg = SamplingConfig(max_new_tokens=N, seed=seed)
        params = SwitchParams(tau0=values[len(values) // 2], decay=0.002)
        a, b = both(models, prompts, cfg, params, tokenizer.pad_token_id, None)
        for b_row in range(len(prompts)):
            total += 1
            if a.responses[b_row] == b.responses[b_row]:
                same += 1
                assert b.stats[b_row]["jsd"] == pytest.approx(a.stats[b_row]["jsd"], rel=1e-4, abs=1e-7)
    assert same >= 0.75 * total


def test_draft_length_rule():
    d = DraftLength(2, 7)
    assert d.k == 7
    d.update(kept_whole=True)
    assert d.k == 7
    for want in (6, 5, 4, 3, 2, 2):
        d.update(kept_whole=False)
        assert d.k == want
    d.update(kept_whole=True)
    d.update(kept_whole=True)
    assert d.k == 6


def test_config_knobs():
    assert SwitchParams(draft_tokens=0).draft_tokens == 0
    for bad in (dict(draft_tokens=-1), dict(draft_min=0),
                dict(draft_tokens=2, draft_min=3)):
        with pytest.raises(ConfigError, match="^draft_"):
            SwitchParams(**bad)


def test_extend_first_rows_only(models, prompts):
    ids, mask = pad_left(prompts, 0)
    resp = torch.randint(10, 4000, (len(prompts), 5), generator=torch.Generator().manual_seed(0))
    full, part = (CachedLM(models["student"], ids, mask, 5, backend="fast") for _ in range(2))
    with torch.no_grad():
        full.prefill(), part.prefill()
        want = full.extend(resp[:, :3])
        got = part.extend(resp[:, :3], rows=2)
    assert got.shape == (2, 3, want.shape[-1]) and part.fed == 3
    torch.testing.assert_close(got, want[:2], atol=1e-5, rtol=1e-4)
    hf = CachedLM(models["student"], ids, mask, 5, backend="hf")
    with torch.no_grad():
        hf.prefill()
        with pytest.raises(ValueError):
            hf.extend(resp[:, :2], rows=2)
