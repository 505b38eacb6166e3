"""Per-seed prediction files and their reuse.

``predictions/<model>/<benchmark>/seed<k>.jsonl`` holds one row per example (``id``, ``output``,
``rougeL``; with several samples also ``outputs`` and ``rougeL_samples``). It is written atomically
once the seed is complete, then ``seed<k>.meta.json`` records the settings it was made with. A seed
is finished when both exist, the settings match and the ids are those of the current run; a rerun
reuses it instead of generating again.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmdistill.errors import ConfigError
from lmdistill.evaluate.predictors import safe_name
from lmdistill.io import read_jsonl, write_json, write_jsonl


def bench_dirname(bench: str) -> str:
    """The folder of a benchmark (``name`` or ``name:split``) under a model's predictions."""
    return safe_name(bench.replace(":", "-"))


def seed_paths(out_dir: Path, model_dir: str, bench_dir: str, seed: int) -> tuple[Path, Path]:
    base = Path(out_dir) / "predictions" / model_dir / bench_dir
    return base / f"seed{seed}.jsonl", base / f"seed{seed}.meta.json"


def load_finished(pred_path: Path, meta_path: Path, fingerprint: dict, ids: list[str]) -> list[dict] | None:
    """The rows of a finished seed file, or None when it must be (re)generated.

    Raises ``ConfigError`` when a finished file was made with other settings, so results made
    under one protocol are never silently mixed with another (use another --out or --overwrite).
    """
    if not pred_path.exists() or not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        rows = read_jsonl(pred_path)
    except (OSError, ValueError):
        return None
    old = meta.get("fingerprint", {})
    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} then, {fingerprint.get(k)!r} now" for k in diff)
        raise ConfigError(f"{pred_path} was made with other settings ({shown}); "
                          "use another --out, or --overwrite to regenerate")
    if [str(r.get("id")) for r in rows] != ids:
        return None
    return rows


def save_seed(pred_path: Path, meta_path: Path, rows: list[dict], fingerprint: dict, summary: dict) -> None:
    write_jsonl(pred_path, rows)
    write_json(meta_path, {"fingerprint": fingerprint, **summary})
