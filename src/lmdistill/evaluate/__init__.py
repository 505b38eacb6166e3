"""Evaluation: the five-benchmark ROUGE-L protocol (MiniLLM), scoring of existing predictions, reports.

- ``metrics``: ``rouge_l``, ``rouge_l_scores``, ``rouge_l_corpus`` (light: no torch import).
- ``run``: ``evaluate_models(models, benchmarks, seeds, out_dir, ...)`` writes results and predictions.
- ``scoring``: ``score_files(predictions, references)`` for ``lmdistill score``.
"""

from lmdistill.evaluate.metrics import rouge_l, rouge_l_corpus, rouge_l_scores

__all__ = ["evaluate_models", "rouge_l", "rouge_l_corpus", "rouge_l_scores", "score_files"]


def __getattr__(name: str):
    if name == "evaluate_models":
        from lmdistill.evaluate.run import evaluate_models

        return evaluate_models
    if name == "score_files":
        from lmdistill.evaluate.scoring import score_files

        return score_files
    raise AttributeError(f"module 'lmdistill.evaluate' has no attribute {name!r}")
