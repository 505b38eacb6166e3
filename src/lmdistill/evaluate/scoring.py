"""Score predictions produced anywhere (this tool, vLLM, an API) against references, by id.

Predictions are JSONL rows with ``id`` and ``output``. References are a bundled benchmark name
(``dolly``, ``sni``, ``selfinst:test252``, ...) or a JSONL file whose rows hold ``id`` and either a
list of strings under ``references`` or one string under ``output`` (both: the union).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmdistill.data import load_examples
from lmdistill.data.registry import BENCHMARKS
from lmdistill.errors import DataError, LmdistillError, Problem
from lmdistill.io import iter_jsonl_rows
from lmdistill.rouge import rouge_l

SHOW_IDS = 10


class IdMismatchError(LmdistillError):
    """Prediction and reference ids do not match."""


def _iter_json_rows(path: Path):
    """Yield ``(line, obj, problem)`` for each non-blank line of a JSONL file whose rows must be objects."""
    if not path.is_file():
        raise DataError([Problem(str(path), None, None, "does not exist" if not path.exists() else "is not a file")])
    for lineno, obj, problem in iter_jsonl_rows(path):
        if problem is None and not isinstance(obj, dict):
            problem = Problem(str(path), lineno, None, f"row must be a JSON object, got {type(obj).__name__}")
        yield lineno, (None if problem else obj), problem


def _row_id(obj: dict, path: Path, lineno: int, problems: list[Problem]) -> str | None:
    rid = obj.get("id")
    if rid is None:
        problems.append(Problem(str(path), lineno, "id", "is missing"))
        return None
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        problems.append(Problem(str(path), lineno, "id", f"must be a string or integer, got {type(rid).__name__}"))
        return None
    return str(rid)


def _check_duplicate(rid: str, lineno: int, seen: dict[str, int], path: Path, problems: list[Problem]) -> bool:
    if rid in seen:
        problems.append(Problem(str(path), lineno, "id", f"duplicates the id {rid!r} of line {seen[rid]}"))
        return True
    seen[rid] = lineno
    return False


def load_predictions(path: str | Path) -> dict[str, str]:
    """``id -> output`` from a predictions JSONL file; every bad row is reported with file:line:field."""
    path = Path(path)
    out: dict[str, str] = {}
    seen: dict[str, int] = {}
    problems: list[Problem] = []
    for lineno, obj, problem in _iter_json_rows(path):
        if problem is not None:
            problems.append(problem)
            continue
        rid = _row_id(obj, path, lineno, problems)
        output = obj.get("output")
        if not isinstance(output, str):
            problems.append(Problem(str(path), lineno, "output",
                                    "is missing" if output is None else f"must be a string, got {type(output).__name__}"))
            continue
        if rid is None or _check_duplicate(rid, lineno, seen, path, problems):
            continue
        out[rid] = output
    if problems:
        raise DataError(problems)
    return out


def _reference_list(obj: dict, path: Path, lineno: int, problems: list[Problem]) -> list[str] | None:
    refs: list[str] = []
    if "references" in obj and obj["references"] is not None:
        val = obj["references"]
        if not isinstance(val, list) or not all(isinstance(r, str) for r in val):
            problems.append(Problem(str(path), lineno, "references", "must be a list of strings"))
            return None
        refs = list(val)
    output = obj.get("output")
    if output is not None:
        if not isinstance(output, str):
            problems.append(Problem(str(path), lineno, "output", f"must be a string, got {type(output).__name__}"))
            return None
        if output not in refs:
            refs = [output] + refs
    if not refs:
        problems.append(Problem(str(path), lineno, "references",
                                "is missing: a row needs a list under \"references\" or a string under \"output\""))
        return None
    return refs


def load_references(source: str | Path) -> dict[str, list[str]]:
    """``id -> references`` from a bundled benchmark name or a JSONL file."""
    src = str(source)
    if src.split(":", 1)[0] in BENCHMARKS and not Path(src).exists():
        return {ex.id: list(ex.references) for ex in load_examples(src).examples}
    path = Path(src)
    out: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    problems: list[Problem] = []
    for lineno, obj, problem in _iter_json_rows(path):
        if problem is not None:
            problems.append(problem)
            continue
        rid = _row_id(obj, path, lineno, problems)
        refs = _reference_list(obj, path, lineno, problems)
        if rid is None or refs is None or _check_duplicate(rid, lineno, seen, path, problems):
            continue
        out[rid] = refs
    if problems:
        raise DataError(problems)
    return out


def _id_list(ids: list[str]) -> str:
    shown = ", ".join(ids[:SHOW_IDS])
    return shown + (f", ... ({len(ids) - SHOW_IDS} more)" if len(ids) > SHOW_IDS else "")


def check_ids(predictions: dict[str, str], references: dict[str, list[str]], *,
              allow_missing: bool = False, pred_name: str = "predictions", ref_name: str = "references") -> list[str]:
    """Return the ids to score (in reference order); raise ``IdMismatchError`` listing the bad ids.

    Ids in the predictions but not the references are always an error. References without a
    prediction are an error unless ``allow_missing`` (then only the predicted ids are scored).
    """
    extra = [i for i in predictions if i not in references]
    missing = [i for i in references if i not in predictions]
    if extra or (missing and not allow_missing):
        parts = [f"ids of {pred_name} do not match {ref_name}:"]
        if extra:
            parts.append(f"{len(extra)} id(s) in {pred_name} have no reference: {_id_list(extra)}")
        if missing and not allow_missing:
            parts.append(f"{len(missing)} reference id(s) have no prediction: {_id_list(missing)}"
                         " (use --allow-missing to score only the predicted ids)")
        parts.append(f"({len(predictions)} predictions, {len(references)} references)")
        raise IdMismatchError("\n".join(parts))
    return [i for i in references if i in predictions]


@dataclass
class ScoreResult:
    rougeL: float
    n: int
    missing: int
    scores: dict[str, float]

    def summary(self) -> dict:
        return {"rougeL": self.rougeL, "n": self.n, "missing": self.missing}


def score_predictions(predictions: dict[str, str], references: dict[str, list[str]], *,
                      allow_missing: bool = False, pred_name: str = "predictions",
                      ref_name: str = "references") -> ScoreResult:
    """Mean ROUGE-L (x100) of ``predictions`` against ``references`` matched by id."""
    ids = check_ids(predictions, references, allow_missing=allow_missing, pred_name=pred_name, ref_name=ref_name)
    if not ids:
        raise IdMismatchError(f"{pred_name} hold no example to score")
    scores = {i: rouge_l(predictions[i].strip(), references[i]) for i in ids}
    return ScoreResult(sum(scores.values()) / len(scores), len(scores), len(references) - len(ids), scores)


def score_files(predictions: str | Path, references: str | Path, *, allow_missing: bool = False) -> ScoreResult:
    return score_predictions(load_predictions(predictions), load_references(references),
                             allow_missing=allow_missing, pred_name=str(predictions), ref_name=str(references))
