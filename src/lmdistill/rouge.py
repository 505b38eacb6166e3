"""ROUGE-L as the MiniLLM protocol computes it (shared by evaluation, training's validation and RSE).

``rouge_score``'s ``RougeScorer(['rougeL'], use_stemmer=True)`` F-measure, the max over the
references of an example, times 100; a corpus score is the mean over examples. It imports nothing else
from the package (and ``rouge_score`` only on first use), so it sits at the bottom of the import layers.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _as_list(references: str | Sequence[str]) -> list[str]:
    if isinstance(references, str):
        return [references]
    refs = list(references)
    if not refs:
        raise ValueError("ROUGE-L needs at least one reference")
    return refs


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure x100 of ``prediction`` against its best-matching reference."""
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in _as_list(references))


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[float]:
    """Per-example ROUGE-L (x100); ``references[i]`` is a string or a list of strings."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
    return [rouge_l(p, r) for p, r in zip(predictions, references)]


def rouge_l_corpus(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean per-example ROUGE-L (x100); 0.0 for an empty corpus."""
    scores = rouge_l_scores(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0
