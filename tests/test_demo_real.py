"""The smollm2 demo's statistics: paired standard errors and verdicts against a float64 brute force."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.demo_real import REAL_PRESETS, _paired, comparisons


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-50, 50), st.floats(-50, 50)), min_size=2, max_size=40))
def test_paired_difference_and_standard_error_match_brute_force(pairs):
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    d, se = _paired(a, b)
    n = len(pairs)
    diffs = [x - y for x, y in pairs]
    mean = sum(diffs) / n
    var = sum((x - mean) ** 2 for x in diffs) / (n - 1)
    assert math.isclose(d, mean, abs_tol=1e-9)
    assert math.isclose(se, math.sqrt(var / n), rel_tol=1e-9, abs_tol=1e-9)


def test_verdicts_beat_only_beyond_two_standard_errors():
    base = [float(i % 7) for i in range(40)]
    scores = {"pruned": base, "sft": [x + 0.5 for x in base],             # constant shift: SE 0, beats
              "kd": [x + (1 if i % 2 else -1) for i, x in enumerate(base)],  # mean 0: indistinguishable
              "gkd": [x - 2 for x in base]}
    lines = comparisons(scores, ["sft", "kd", "gkd"], baseline="sft")
    assert lines[0].startswith("- `sft` **beats** `pruned`: +0.50")
    assert "`kd` is **not distinguishable from** `pruned`" in lines[1]
    assert "`gkd` is **worse than** `pruned`" in lines[3] and "`gkd` is **worse than** `sft`" in lines[4]
    kl = comparisons({"pruned": [7.0, 6.0, 8.0], "sft": [4.0, 3.0, 5.0]}, ["sft"], None, unit="KL",
                     lower_is_better=True)
    assert kl == ["- `sft` **beats** `pruned`: -3.00 KL (2 x paired standard error = 0.00, 3 prompts)"]


def test_presets_are_consistent():
    for name, p in REAL_PRESETS.items():
        assert p.ice_budget >= 25, name          # one mutant costs the 25 English identity questions
        assert p.max_prompt_length < p.max_length and "sft" in p.methods
