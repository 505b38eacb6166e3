"""The cost of a cross-tokenizer step (``uld``, ``gold``) against a same-tokenizer KD step at equal shapes, where
its time goes, and the alignment coverage on Dolly (issue 32, item 4).

    .venv/bin/python bench/cross_tokenizer.py [--steps 6] [--batch 4] [--rows 400] [--threads 1]
                                              [--cache runs/bench-models] [--json FILE] [--quick]

**Cost** (goal: a cross-tokenizer step at most 1.5x a KD step). One student, the pruned SmolLM2 of ``bench_models.py``
(10 of 30 blocks), trains ``--steps`` steps of ``--batch`` Dolly rows (its chat template, lengths 256 / prompt 128,
the gold responses: ``policy=gold``, so every run trains the same rows) through the trainer's own step
(``Run.step``: sequences, the teacher, the student's forward and backward, AdamW); seconds per step are the median of
steps 2..N, wall and CPU (this process's; with one torch thread the CPU time is the wall time of a quiet machine). Runs:

- ``kd``: forward KL from SmolLM2-135M-Instruct, the student's own tokenizer (the baseline);
- ``uld``, ``gold``: from a teacher of the *same architecture and shape* (SmolLM2-135M's config: 30 blocks, hidden
  576, 49,152 vocabulary rows) with *another tokenizer*: a SentencePiece-style BPE (``▁``, byte fallback, Gemma's
  decoder) of 49,152 ids trained on Dolly (``train_sp_tokenizer``); random weights (a step's cost does not depend on
  them). The ratio to ``kd`` is the cost of reading a teacher through another tokenizer;
- context, not the goal's shapes: ``uld`` through ``xtok:`` with SmolLM2 itself (identical tokenizers: every group
  one to one), and ``uld`` / ``gold`` from Gemma-3-270M (the real pair: 18 blocks, hidden 640, 262,144 ids).

**Where the time goes**: one batch of the cross-tokenizer runs in parts: the teacher's rows (its template, its
tokenizer, the byte spelling and the group walk: ``teacher.rows``), the teacher's forward, the vocabulary matching
(``gold`` only, once per run), the term on the student's logits (merge, sorts, JSD) and the student's forward and
backward.

**Coverage**: the share of response bytes in one-to-one groups over the first ``--rows`` Dolly training rows (gold
responses, whole), both directions of SmolLM2 <-> Gemma-3 and tiny (lmdistill's tokenizer) <-> SmolLM2; also the
student's and the teacher's tokens per response.

``--quick`` (``make bench-smoke``): the tiny student, tiny-teacher (lmdistill's tokenizer) and a tiny-teacher-shaped
model with a 4,096-id SentencePiece-style tokenizer, 16 rows of lengths 128 / 96, 3 steps of batch 2, the coverage of
that pair on 16 rows; no real model, everything in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_models import models  # noqa: E402

from lmdistill.data import collate_for_training, load_examples, tokenize_examples  # noqa: E402
from lmdistill.io import write_json  # noqa: E402
from lmdistill.losses.term import TermInputs  # noqa: E402
from lmdistill.losses.uld import GOLDTerm, ULDTerm  # noqa: E402
from lmdistill.models import build_tokenizer, load_model, load_tokenizer  # noqa: E402
from lmdistill.models.pretrained import get_pretrained  # noqa: E402
from lmdistill.models.tokenizer import train_sp_tokenizer  # noqa: E402
from lmdistill.teachers import open_teacher  # noqa: E402
from lmdistill.teachers.cross_rows import Tokenizers  # noqa: E402
from lmdistill.train import load_config  # noqa: E402
from lmdistill.train.run import Run  # noqa: E402


def other_teacher(shape_of: Path, out: Path, seed: int = 1) -> Path:
    """A model of ``shape_of``'s architecture and size whose tokenizer is a SentencePiece-style BPE with as many ids
    as ``shape_of`` has vocabulary rows (random weights), built once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "model.safetensors").exists():
        return out
    config = AutoConfig.from_pretrained(shape_of)
    tok = train_sp_tokenizer(config.vocab_size - 256, limit=None)   # + its 256 byte-fallback pieces
    config.vocab_size = max(config.vocab_size, len(tok))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def settings(args, student: Path, teacher: str, out: Path) -> list[str]:
    return [f"student={student}", f"teacher={teacher}", f"output_dir={out}", "policy=gold", "template=chat",
            f"batch_size={args.batch}", f"micro_batch_size={args.batch}", f"max_steps={args.steps}",
            f"max_train_examples={args.steps * args.batch * 4}", f"max_length={args.max_length}",
            f"max_prompt_length={args.max_prompt}", "valid_data=", "eval_steps=100000", "save_steps=100000",
            "progress=false", "device=cpu", "lr=2e-4", "seed=1"]


def time_run(name: str, recipe: str, teacher: str, student: Path, args, out: Path, extra=()) -> dict:
    """Seconds per step (median of steps 2..N, wall and CPU) of ``recipe`` from ``teacher``."""
    cfg = load_config(recipe, [*settings(args, student, teacher, out / name), *extra])
    run = Run(cfg)
    walls, cpus, tokens, cover = [], [], [], []
    for step in range(args.steps):
        w, c = time.perf_counter(), time.process_time()
        m = run.step(step)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
        tokens.append(m["tokens"])
        cover += [v for k, v in m.items() if k.endswith("/coverage")]
    row = {"run": name, "wall_s": statistics.median(walls[1:]), "cpu_s": statistics.median(cpus[1:]),
           "tokens": statistics.mean(tokens), "coverage": statistics.mean(cover) if cover else None,
           "load": os.getloadavg()[0]}
    said = f", coverage {row['coverage']:.3f}" if cover else ""
    print(f"  {name:<12} {row['wall_s']:7.2f} s wall  {row['cpu_s']:7.2f} s CPU per step  ({row['tokens']:.0f} "
          f"tokens/step{said}; load {row['load']:.1f})", flush=True)
    return row


def breakdown(name: str, student: Path, teacher_dir: Path, term, args) -> dict:
    """One batch of a cross-tokenizer step in parts (seconds; the second of two passes, the first warms up)."""
    tok = load_tokenizer(str(student))
    model = load_model(str(student), trainable=True)
    rows, _ = tokenize_examples(load_examples("dolly:train").examples[:64], tok, template="chat",
                                max_prompt_length=args.max_prompt, max_length=args.max_length)
    rows = rows[:args.batch]
    batch = collate_for_training(rows, tok.pad_token_id)
    teacher = open_teacher(f"xtok:{teacher_dir}", tokenizer=tok)
    t = time.perf_counter()
    _ = teacher.tokenizers.matched if isinstance(term, GOLDTerm) else None
    parts = {"vocabulary matching (once per run)": time.perf_counter() - t}
    for _ in range(2):
        inputs = TermInputs(model, teacher, batch, batch, same=True, whole=False, rows=rows, tokenizer=tok)
        t = time.perf_counter()
        teacher.rows(rows)
        parts["teacher rows: template, tokenizer, byte walk"] = walk = time.perf_counter() - t
        t = time.perf_counter()
        _ = inputs.teacher_aligned   # the rows again, then the teacher's forward
        parts["teacher forward"] = time.perf_counter() - t - walk
        t = time.perf_counter()
        _ = inputs.student_logits
        parts["student forward"] = time.perf_counter() - t
        t = time.perf_counter()
        value = term(inputs)
        parts["term: merge, sort, distances"] = time.perf_counter() - t
        t = time.perf_counter()
        value.backward()
        parts["student backward (term + model)"] = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
    print(f"  {name}: " + ", ".join(f"{k} {v:.3f} s" for k, v in parts.items()), flush=True)
    return {"run": name, **parts}


def coverage(name: str, student_tok, teacher_tok, template: str, n: int) -> dict:
    """The share of response bytes in one-to-one groups over the first ``n`` Dolly rows (whole gold responses)."""
    tokenizers = Tokenizers(student_tok, teacher_tok, "auto")
    rows, _ = tokenize_examples(load_examples("dolly:train").examples[:n], student_tok, template=template,
                                max_prompt_length=100_000, max_length=100_000)
    one = total = s_tokens = t_tokens = 0
    for row in rows:
        r = tokenizers.row(row)
        one, total = one + r.bytes_one_to_one, total + r.bytes_total
        s_tokens, t_tokens = s_tokens + r.student_len, t_tokens + len(r.response_ids)
    out = {"pair": name, "rows": len(rows), "coverage": one / total, "student_tokens": s_tokens,
           "teacher_tokens": t_tokens, "bytes": total}
    print(f"  {name:<34} coverage {out['coverage']:.3f} over {total} bytes of {len(rows)} responses; tokens: "
          f"student {s_tokens}, teacher {t_tokens}", flush=True)
    return out


def measure(args, student: Path, same: Path, other: Path, extra_runs=()) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.work)
    print(f"cost: student {student}, {args.steps} steps of {args.batch} rows (lengths {args.max_length} / "
          f"{args.max_prompt}), {args.threads} torch thread(s), load {os.getloadavg()[0]:.1f}", flush=True)
    kd = ["objective.sft.weight=0", "objective.fkl.weight=1"]
    runs = [time_run("kd", "kd", str(same), student, args, out, kd),
            time_run("uld", "uld", f"xtok:{other}", student, args, out),
            time_run("gold", "gold", f"xtok:{other}", student, args, out)]
    runs += [time_run(name, recipe, spec, student, args, out) for name, recipe, spec in extra_runs]
    base = runs[0]
    for r in runs:
        r["ratio_wall"], r["ratio_cpu"] = r["wall_s"] / base["wall_s"], r["cpu_s"] / base["cpu_s"]
    print("ratios to kd (wall / CPU): " + ", ".join(f"{r['run']} {r['ratio_wall']:.2f}x / {r['ratio_cpu']:.2f}x"
                                                     for r in runs[1:]), flush=True)
    print("where a cross-tokenizer step's time goes:", flush=True)
    parts = [breakdown("uld", student, other, ULDTerm(), args), breakdown("gold", student, other, GOLDTerm(), args)]
    return {"runs": runs, "parts": parts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rows", type=int, default=400, help="Dolly rows of the coverage")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="runs/bench-models", help="where the models are built or converted once")
    ap.add_argument("--work", default="runs/bench-cross-tokenizer", help="the runs' folders")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny models, 3 steps of 2, 16 rows")
    args = ap.parse_args()
    args.max_length, args.max_prompt = 256, 128
    if args.quick:
        args.steps, args.batch, args.rows, args.max_length, args.max_prompt = 3, 2, 16, 128, 96
        with tempfile.TemporaryDirectory(prefix="bench-xtok-") as tmp:
            args.work = f"{tmp}/runs"
            same, student = models("tiny", Path(tmp) / "models")
            other = other_teacher(same, Path(tmp) / "models" / "tiny-teacher-sp")
            measure(args, student, same, other)
            coverage("tiny <- sp (4096 ids)", build_tokenizer(), load_tokenizer(str(other)), "chat", args.rows)
        return
    cache = Path(args.cache)
    same, student = models("smollm2", cache)
    other = other_teacher(same, cache / "smollm2-shape-sp49152")
    gemma = get_pretrained("gemma-3-270m", cache / "gemma-3-270m")
    results = measure(args, student, same, other, [("uld-same-tok", "uld", f"xtok:{same}"),
                                                   ("uld-gemma3", "uld", f"xtok:{gemma}"),
                                                   ("gold-gemma3", "gold", f"xtok:{gemma}")])
    print(f"coverage on the first {args.rows} Dolly rows:", flush=True)
    smol, gem, tiny = load_tokenizer(str(same)), load_tokenizer(str(gemma)), build_tokenizer()
    results["coverage"] = [coverage("SmolLM2 (student) <- Gemma-3", smol, gem, "chat", args.rows),
                           coverage("Gemma-3 (student) <- SmolLM2", gem, smol, "alpaca", args.rows),
                           coverage("tiny (student) <- SmolLM2", tiny, smol, "chat", args.rows),
                           coverage("SmolLM2 (student) <- tiny", smol, tiny, "chat", args.rows)]
    if args.json:
        write_json(args.json, {"args": vars(args), **results})


if __name__ == "__main__":
    main()
