"""The audit's AUC and its bootstrap interval (quantify/audit.py) against brute force in float64."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.errors import ConfigError
from lmdistill.quantify.audit import Separation, prompt_aucs, separation, separation_sentence


def _brute_auc(scores, pos, neg, prompts, higher_is_closer=True):
    """P(distilled > independent on the same prompt), ties 1/2: every (prompt, positive, negative) triple."""
    total, count = 0.0, 0
    for p in prompts:
        for i in pos:
            for j in neg:
                a, b = scores[i][p], scores[j][p]
                if not higher_is_closer:
                    a, b = -a, -b
                total += 1.0 if a > b else 0.5 if a == b else 0.0
                count += 1
    return total / count


def _scores(draw_rows, n_prompts):
    return {m: {f"q{k}": float(v) for k, v in enumerate(row[:n_prompts])} for m, row in draw_rows.items()}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 7), st.data())
def test_auc_equals_the_brute_force_count_over_triples(n_pos, n_neg, n_prompts, data):
    values = st.one_of(st.integers(0, 3).map(float), st.floats(-5, 5))   # small integers: many ties
    rows = {f"m{i}": data.draw(st.lists(values, min_size=n_prompts, max_size=n_prompts))
            for i in range(n_pos + n_neg)}
    scores = _scores(rows, n_prompts)
    pos, neg = [f"m{i}" for i in range(n_pos)], [f"m{i}" for i in range(n_pos, n_pos + n_neg)]
    prompts = list(scores["m0"])
    for closer in (True, False):
        s = separation(scores, pos, neg, higher_is_closer=closer, resamples=50)
        assert math.isclose(s.auc, _brute_auc(scores, pos, neg, prompts, closer), abs_tol=1e-12)
        per_prompt = prompt_aucs_of(scores, pos, neg, prompts, closer)   # resample means lie within their range
        assert min(per_prompt) - 1e-12 <= s.low <= s.high <= max(per_prompt) + 1e-12
    # the groups swapped: 1 - AUC; a KL-like distance read the other way round: the same as negated scores
    swapped = separation(scores, neg, pos, resamples=50)
    assert math.isclose(swapped.auc, 1 - separation(scores, pos, neg, resamples=50).auc, abs_tol=1e-12)


def prompt_aucs_of(scores, pos, neg, prompts, closer):
    sign = 1 if closer else -1
    return prompt_aucs(np.array([[sign * scores[m][p] for p in prompts] for m in pos]),
                       np.array([[sign * scores[m][p] for p in prompts] for m in neg]))


def test_bootstrap_uses_the_seeded_draws_of_prompts_and_percentiles():
    rng = np.random.default_rng(7)
    scores = {m: {f"q{k}": float(v) for k, v in enumerate(rng.normal(size=9))} for m in "abcde"}
    s = separation(scores, ["a", "b", "c"], ["d", "e"], resamples=300, seed=3)
    prompts = list(scores["a"])
    per_prompt = [_brute_auc(scores, ["a", "b", "c"], ["d", "e"], [p]) for p in prompts]
    draws = np.random.default_rng(3).integers(0, 9, size=(300, 9))
    means = sorted(sum(per_prompt[k] for k in row) / 9 for row in draws)
    # numpy's default percentile: linear interpolation at rank q/100 * (B - 1)
    def pct(q):
        r = q / 100 * (len(means) - 1)
        lo = math.floor(r)
        return means[lo] + (means[min(lo + 1, len(means) - 1)] - means[lo]) * (r - lo)
    assert math.isclose(s.low, pct(2.5), abs_tol=1e-12) and math.isclose(s.high, pct(97.5), abs_tol=1e-12)
    assert (s.resamples, s.level, s.prompts) == (300, 0.95, 9)


def test_bootstrap_interval_matches_the_exact_bootstrap_distribution():
    """With 4 prompts the bootstrap distribution is known exactly (all 4^4 equally likely resamples): the
    percentile interval of many resamples lands on its exact 2.5% and 97.5% quantiles."""
    # one positive, one negative: AUC_p is 1, 0.5 or 0 per prompt
    scores = {"d": {"a": 2.0, "b": 2.0, "c": 1.0, "e": 0.0}, "i": {"a": 1.0, "b": 1.0, "c": 1.0, "e": 1.0}}
    per_prompt = [1.0, 1.0, 0.5, 0.0]
    means = sorted(sum(c) / 4 for c in itertools.product(per_prompt, repeat=4))
    cdf = lambda v: sum(m <= v + 1e-12 for m in means) / len(means)
    exact = {q: next(v for v in means if cdf(v) >= q) for q in (0.025, 0.975)}
    # the levels are not near a jump of the CDF, so 40000 resamples cannot miss the exact quantile
    for q, v in exact.items():
        below = max([m for m in means if m < v], default=-1.0)
        assert cdf(below) < q - 0.005 and cdf(v) > q + 0.005
    s = separation(scores, ["d"], ["i"], resamples=40000, seed=11)
    assert s.auc == pytest.approx(sum(per_prompt) / 4, abs=1e-12)
    assert s.low == pytest.approx(exact[0.025], abs=1e-12) and s.high == pytest.approx(exact[0.975], abs=1e-12)


def test_only_prompts_scored_for_every_model_count():
    scores = {"a": {"p1": 3.0, "p2": 0.0, "p3": 5.0}, "b": {"p1": 1.0, "p2": 9.0, "p3": float("nan")},
              "c": {"p1": 2.0, "p2": 1.0}}
    s = separation(scores, ["a"], ["b", "c"], resamples=20)
    assert s.prompts == 2 and s.auc == pytest.approx(_brute_auc(scores, ["a"], ["b", "c"], ["p1", "p2"]))


def test_verdicts_and_sentences():
    base = dict(auc=0.6, prompts=16, positives=("kd",), negatives=("sft",), resamples=2000, level=0.95)
    assert Separation(low=0.55, high=0.7, **base).verdict == "separates"
    assert Separation(low=0.2, high=0.45, **base).verdict == "reversed"
    unsure = Separation(low=0.45, high=0.75, **base)
    assert unsure.verdict == "cannot tell apart"
    assert separation_sentence("RSE", unsure) == ("RSE cannot tell the distilled students from the independent "
                                                  "models: the interval contains 0.5 (AUC 0.60, 95% interval "
                                                  "0.45-0.75 over 16 prompts).")
    assert unsure.as_dict()["verdict"] == "cannot tell apart"


def test_bad_input_is_refused_by_name():
    with pytest.raises(ConfigError, match="missing: gemma"):
        separation({"kd": {"p": 1.0}}, ["kd"], ["gemma"])
    with pytest.raises(ConfigError, match="no prompt was scored"):
        separation({"kd": {"p": 1.0}, "sft": {"q": 1.0}}, ["kd"], ["sft"])
    with pytest.raises(ConfigError, match="resamples 0"):
        separation({"kd": {"p": 1.0}, "sft": {"p": 1.0}}, ["kd"], ["sft"], resamples=0)
