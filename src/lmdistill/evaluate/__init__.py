"""Evaluation: the five-benchmark ROUGE-L protocol (MiniLLM), scoring of existing predictions, reports.

- ``run``: ``evaluate_models(models, benchmarks, seeds, out_dir, ...)`` writes results and predictions.
- ``scoring``: ``score_files(predictions, references)`` for ``lmdistill score``.
- ``predictors`` / ``store`` / ``report``: the models under evaluation, the result files, the tables.

ROUGE-L itself is ``lmdistill.rouge`` (training's validation and RSE use it too).
"""

from lmdistill.evaluate.run import evaluate_models
from lmdistill.evaluate.scoring import score_files

__all__ = ["evaluate_models", "score_files"]
