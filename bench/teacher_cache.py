"""The offline teacher cache against the live teacher (issue 17, item 4).

    .venv/bin/python bench/teacher_cache.py [--model smollm2|tiny] [--rows 400] [--steps 20] [--out DIR]

Part 1, size: ``lmdistill capture`` of the teacher over the first ``--rows`` Dolly training rows (the demo's chat
template and lengths) at K = 16, 64, 256 (float16 log-probabilities): bytes per token, capture time, and how much of
the KD loss the top-k keeps (forward KL of the teacher's bins vs the dense forward KL, the pruned student on the
same rows). DistillKit reports about 114-300 bytes per token for its compressed top-k captures (figures quoted in
issue 17; its repository could not be fetched here).

Part 2, training: the demo's KD run (20 steps, batch 4, 128 tokens, lr 2e-4, SmolLM2-135M-Instruct into its 10-layer
pruned student) twice, each in its own process, on the same ``--rows`` rows: with the live teacher (the baseline)
and from the K = 64 cache. Printed: seconds per step (median of steps 2..N), peak RSS of the process, and the ROUGE-L
of the two students on the demo's evaluation (Dolly + Self-Instruct, first 40 examples each, seeds 10 and 20, 64 new
tokens) with the paired difference and its standard error.

``--quick``: a smoke run of both parts (``make bench-smoke``): the tiny models, 16 rows, K = 16 and 64, 2 steps, an
evaluation of 4 Dolly examples at 16 new tokens (seeds 10 and 20), everything in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmdistill.data import collate_for_training, load_examples, tokenize_examples
from lmdistill.evaluate.run import evaluate_models
from lmdistill.losses import get_loss
from lmdistill.losses.model_forward import selected_logits
from lmdistill.losses.sparse import sparse_divergence
from lmdistill.models import load_model, load_tokenizer
from lmdistill.teachers import TeacherCache
from lmdistill.teachers.capture import CaptureSettings, capture

from bench_models import models

TEMPLATE, MAX_LEN, MAX_PROMPT = "chat", 128, 96
KS = (16, 64, 256)
TRAIN_K = 64


def kept_kd(teacher: Path, student: Path, cache_dir: Path, rows: int) -> dict:
    """Dense forward KL vs forward KL on the cache's bins, on the first 32 rows (pruned student)."""
    tok = load_tokenizer(str(teacher))
    data, _ = tokenize_examples(load_examples("dolly:train").examples[:rows], tok, template=TEMPLATE,
                                max_prompt_length=MAX_PROMPT, max_length=MAX_LEN)
    data = data[:32]
    cache = TeacherCache(cache_dir)
    t_model, s_model = load_model(str(teacher)), load_model(str(student))
    dense, sparse = [], []
    for i in range(0, len(data), 8):
        rows_i = data[i:i + 8]
        batch = collate_for_training(rows_i, tok.pad_token_id)
        mask = batch["loss_mask"][:, 1:]
        with torch.no_grad():
            t = selected_logits(t_model, batch, mask)
            s = selected_logits(s_model, batch, mask)
        n = int(mask.sum())
        dense.append((float(get_loss("fkl")(s, t[:, :cache.vocab] if t.shape[-1] > cache.vocab else t)) * n, n))
        sparse.append((float(sparse_divergence("fkl", s, cache.top_k(rows_i, batch))) * n, n))
    d = sum(x for x, _ in dense) / sum(n for _, n in dense)
    sp = sum(x for x, _ in sparse) / sum(n for _, n in sparse)
    return {"dense_fkl": d, "sparse_fkl": sp, "kept": sp / d if d else None}


def part_size(teacher: Path, student: Path, out: Path, rows: int, ks: tuple[int, ...] = KS) -> list[dict]:
    table = []
    for k in ks:
        folder = out / f"cache-k{k}"
        t0 = time.time()
        m = capture(CaptureSettings(str(teacher), "dolly:train", str(folder), top_k=k, limit=rows, template=TEMPLATE,
                                    max_prompt_length=MAX_PROMPT, max_length=MAX_LEN, batch_size=8, device="cpu",
                                    progress=True))
        table.append({"k": k, "rows": m["rows"], "tokens": m["tokens"], "bytes_per_token": m["bytes_per_token"],
                      "mb": m["bytes"] / 1e6, "capture_s": time.time() - t0, **kept_kd(teacher, student, folder, rows)})
    return table


def train_child(args) -> None:
    """One KD run in this process (``--child live|cache``); prints a JSON line with its timings and peak RSS."""
    from lmdistill.train import Callback, load_config, train

    class Timer(Callback):
        def __init__(self):
            self.times, self.t = [], None

        def on_step_begin(self, run, step):
            self.t = time.perf_counter()

        def on_step_end(self, run, step, metrics):
            self.times.append(time.perf_counter() - self.t)

    teacher = args.teacher if args.child == "live" else f"cache:{args.cache}"
    cfg = load_config("kd", [f"student={args.student}", f"teacher={teacher}", f"output_dir={args.run}",
                             "template=chat", f"max_steps={args.steps}", "lr=2e-4", "batch_size=4",
                             "micro_batch_size=4", f"max_length={MAX_LEN}", f"max_prompt_length={MAX_PROMPT}",
                             f"max_train_examples={args.rows}", f"save_steps={args.steps}", "eval_steps=100000",
                             "valid_data=", f"warmup_steps={args.steps // 10}", "seed=42", "progress=false",
                             "device=cpu"])
    timer = Timer()
    t0 = time.time()
    result = train(cfg, callbacks=[timer])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"final": result["final"], "wall_s": time.time() - t0, "step_s": timer.times,
                      "peak_rss_mib": peak}))


def part_train(teacher: Path, student: Path, out: Path, rows: int, steps: int, eval_limit: int = 40,
               eval_tokens: int = 64, benchmarks: tuple[str, ...] = ("dolly", "selfinst")) -> dict:
    runs = {}
    for kind in ("live", "cache"):
        cmd = [sys.executable, __file__, "--child", kind, "--teacher", str(teacher), "--student", str(student),
               "--cache", str(out / f"cache-k{TRAIN_K}"), "--run", str(out / f"kd-{kind}"), "--rows", str(rows),
               "--steps", str(steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode:
            raise SystemExit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
        runs[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    specs = [f"kd-{kind}={runs[kind]['final']}" for kind in runs]
    results = evaluate_models(specs, benchmarks, (10, 20), out / "eval", batch_size=40, limit=eval_limit,
                              max_new_tokens=eval_tokens, device="cpu", template="chat")
    return {"runs": runs, "eval": results}


def per_example(out: Path, results: dict, name: str) -> list[float]:
    from lmdistill.demo_real import per_example_scores

    return per_example_scores(out / "eval", results, name)


def report(size: list[dict], trained: dict | None, out: Path, args) -> str:
    lines = [f"`bench/teacher_cache.py --model {args.model} --rows {args.rows} --steps {args.steps}`", "",
             "| K | rows | tokens | bytes/token | MB | capture s | dense fKL | top-k fKL | kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in size:
        lines.append(f"| {r['k']} | {r['rows']} | {r['tokens']} | {r['bytes_per_token']:.1f} | {r['mb']:.2f} | "
                     f"{r['capture_s']:.1f} | {r['dense_fkl']:.4f} | {r['sparse_fkl']:.4f} | {r['kept']:.3f} |")
    if trained:
        lines += ["", "| KD run | s/step (median) | wall s | peak RSS MiB | ROUGE-L | vs live |", "|---|---|---|---|---|---|"]
        live_scores = per_example(out, trained["eval"], "kd-live")
        for kind, run in trained["runs"].items():
            step = statistics.median(run["step_s"][1:] or run["step_s"])
            scores = per_example(out, trained["eval"], f"kd-{kind}")
            mean = statistics.fmean(scores)
            diffs = [a - b for a, b in zip(scores, live_scores)]
            se = statistics.stdev(diffs) / len(diffs) ** 0.5 if kind != "live" else 0.0
            base = trained["runs"]["live"]
            rel = (f"{step / statistics.median(base['step_s'][1:] or base['step_s']):.2f}x time, "
                   f"{run['peak_rss_mib'] / base['peak_rss_mib']:.2f}x memory, "
                   f"ROUGE-L {statistics.fmean(diffs):+.2f} (SE {se:.2f})") if kind != "live" else "baseline"
            lines.append(f"| {kind} | {step:.2f} | {run['wall_s']:.0f} | {run['peak_rss_mib']:.0f} | {mean:.2f} | {rel} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--rows", type=int, default=400, help="Dolly training rows captured and trained on")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="runs/bench-teacher-cache")
    ap.add_argument("--skip-train", action="store_true", help="only part 1 (sizes)")
    ap.add_argument("--child", choices=["live", "cache"], help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    ap.add_argument("--student", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny models, 16 rows, 2 steps, 4 evaluation examples, in a temporary folder")
    args = ap.parse_args()
    if args.child:
        train_child(args)
        return
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="bench-teacher-cache-") as tmp:
            args.model, args.rows, args.steps, args.out = "tiny", 16, 2, tmp
            measure(args, Path(tmp) / "models", ks=(16, TRAIN_K), eval_limit=4, eval_tokens=16,
                    benchmarks=("dolly",))
        return
    measure(args, Path("runs/bench-cache"))


def measure(args, cache: Path, ks: tuple[int, ...] = KS, **eval_settings) -> None:
    out = Path(args.out)
    teacher, student = models(args.model, cache)
    size = part_size(teacher, student, out, args.rows, ks)
    print(report(size, None, out, args))
    trained = None if args.skip_train else part_train(teacher, student, out, args.rows, args.steps, **eval_settings)
    text = report(size, trained, out, args)
    (out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
