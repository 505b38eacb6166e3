"""ROUGE-L of lmdistill.rouge against direct rouge_score computations."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from lmdistill.data import load_examples
from lmdistill.rouge import rouge_l, rouge_l_corpus, rouge_l_scores

DIRECT = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def direct(pred: str, refs: list[str]) -> float:
    return 100 * max(DIRECT.score(r, pred)["rougeL"].fmeasure for r in refs)


def test_single_reference_matches_rouge_score():
    pred, ref = "The cats were running quickly", "a cat runs quickly"
    assert rouge_l(pred, [ref]) == pytest.approx(direct(pred, [ref]))
    assert rouge_l(pred, ref) == rouge_l(pred, [ref])
    # the stemmer matters here: "cats"/"cat" and "running"/"runs" match only when stemmed
    unstemmed = 100 * rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert rouge_l(pred, [ref]) > unstemmed


def test_max_over_references_on_sni_rows():
    rows = [e for e in load_examples("sni").examples if len(e.references) > 2][:20]
    assert rows
    for ex in rows:
        pred = ex.references[-1] + " extra words"  # matches the last reference best, not the first
        got = rouge_l(pred, ex.references)
        assert got == pytest.approx(direct(pred, ex.references))
        assert got >= 100 * DIRECT.score(ex.references[0], pred)["rougeL"].fmeasure


def test_corpus_is_the_mean_of_examples():
    exs = load_examples("dolly").examples[:15]
    preds = [e.instruction for e in exs]
    refs = [e.references for e in exs]
    expected = [direct(p, r) for p, r in zip(preds, refs)]
    assert rouge_l_scores(preds, refs) == pytest.approx(expected)
    assert rouge_l_corpus(preds, refs) == pytest.approx(sum(expected) / len(expected))
    assert 0 < rouge_l_corpus(preds, refs) < 100


def test_edge_cases():
    assert rouge_l("same text", ["same text"]) == pytest.approx(100.0)
    assert rouge_l("", ["something"]) == 0.0
    assert rouge_l_corpus([], []) == 0.0
    with pytest.raises(ValueError):
        rouge_l("x", [])
    with pytest.raises(ValueError):
        rouge_l_corpus(["a", "b"], [["a"]])


WORDS = ["running", "runs", "cats", "cat", "the", "quickly", "Generously", "was", "is", "tokens", "Ünïcode", "a1",
         "connection", "connected", "happiness", "happy", "x", "42", "re-run", "don't"]


@settings(max_examples=300, deadline=None)
@given(pred=st.lists(st.sampled_from(WORDS) | st.text(max_size=8), max_size=30).map(" ".join),
       refs=st.lists(st.lists(st.sampled_from(WORDS) | st.text(max_size=8), max_size=30).map(" ".join),
                     min_size=1, max_size=3))
def test_equals_rouge_score_exactly_on_generated_texts(pred, refs):
    """The cached tokenizer and stemmer change nothing: bit-equal to ``RougeScorer.score`` (repeated texts too)."""
    want = 100 * max(DIRECT.score(r, pred)["rougeL"].fmeasure for r in refs)
    assert rouge_l(pred, refs) == want
    assert rouge_l(pred, refs) == want    # the second time from the token cache
