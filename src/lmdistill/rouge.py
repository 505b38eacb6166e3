"""ROUGE-L as the MiniLLM protocol computes it (shared by evaluation, training's validation and RSE).

``rouge_score``'s ``RougeScorer(['rougeL'], use_stemmer=True)`` F-measure, the max over the
references of an example, times 100; a corpus score is the mean over examples. It imports nothing else
from the package (and ``rouge_score`` only on first use), so it sits at the bottom of the import layers.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence


@lru_cache(maxsize=1)
def _stemmed_tokenizer():
    """``rouge_score``'s tokenizer with its Porter stemmer (as ``RougeScorer(['rougeL'], use_stemmer=True)`` builds
    it), each word's stem computed once: an evaluation scores the same references for every seed and model, and
    stemming was most of ROUGE's time."""
    from nltk.stem import porter
    from rouge_score import tokenize

    class CachedStemmer:
        stem = staticmethod(lru_cache(maxsize=1 << 16)(porter.PorterStemmer().stem))

    return lambda text: tokenize.tokenize(text, CachedStemmer)


@lru_cache(maxsize=1 << 12)
def _tokens(text: str) -> tuple[str, ...]:
    return tuple(_stemmed_tokenizer()(text))


def _fmeasure(reference: str, prediction: str) -> float:
    """``RougeScorer(['rougeL'], use_stemmer=True).score(reference, prediction)['rougeL'].fmeasure``, with the
    token lists of repeated texts reused (tests/test_eval_metrics.py checks equality with ``rouge_score``)."""
    from rouge_score.rouge_scorer import _score_lcs

    return _score_lcs(list(_tokens(reference)), list(_tokens(prediction))).fmeasure


def _as_list(references: str | Sequence[str]) -> list[str]:
    if isinstance(references, str):
        return [references]
    refs = list(references)
    if not refs:
        raise ValueError("ROUGE-L needs at least one reference")
    return refs


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure x100 of ``prediction`` against its best-matching reference."""
    return 100.0 * max(_fmeasure(ref, prediction) for ref in _as_list(references))


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[float]:
    """Per-example ROUGE-L (x100); ``references[i]`` is a string or a list of strings."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
    return [rouge_l(p, r) for p, r in zip(predictions, references)]


def rouge_l_corpus(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean per-example ROUGE-L (x100); 0.0 for an empty corpus."""
    scores = rouge_l_scores(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0
