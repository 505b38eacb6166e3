"""Training throughput of on-policy GKD: ``lmdistill train gkd`` against TRL's ``GKDTrainer`` (issue 5).

    .venv/bin/python bench/train.py [--steps 24] [--warmup 3] [--repeats 5] [--batch 8] [--threads 1] [--quick] [--coin batch|sequence]
                                    [--out FILE.md] [--trl-cut-gold] [--only ours|trl] [--profile PREFIX]

Results and the exact commands: ``bench/README.md``. The two workers (and the flags they share, such as
``--recipe kd`` or ``--device cuda --precision bf16``, which ``gpu_check.py`` uses) are in ``bench_trainers.py``.
``--quick``: a smoke run of the same comparison (3 measured steps after 1 warm-up, batch 4, 16 new tokens, lengths
256 / 128, the first 500 Dolly rows), which ``make bench-smoke`` runs.

Both runs distill ``tiny-student`` (seed 0) from ``tiny-teacher`` (seed 1) on Dolly (``dolly:train``) with GKD
(lambda 0.5, generalized JSD beta 0.5, 64 new tokens, sampling temperature 1.0, top-k 0, top-p 1), batch 8, one
micro-batch per step, max length 512 / prompt 256, AdamW lr 5e-4, weight decay 0.01, clip 1.0, cosine schedule,
float32 on CPU, ``--warmup + --steps`` optimiser steps. Each trainer runs in its own subprocess with the same
``torch.set_num_threads`` (and OMP/MKL thread variables).

Both trainers see the *same rows in the same order*: the TRL worker tokenizes Dolly with our tokenizer, template
and length filter and lays out the dataset in our trainer's step order (``global_batch_indices``), passing
``input_ids`` + ``completion_mask`` to TRL's ``DataCollatorForChatML`` and a sequential sampler. Both train the
full gold responses on off-policy rows (``--trl-cut-gold`` cuts TRL's to ``--new-tokens``, for comparison with
older runs).

Throughput = trained response tokens / wall seconds from the end of the last warm-up step to the end of the last
step (model loading, dataset preparation and warm-up excluded; per-step overhead such as logging included).
A second figure, tokens per CPU-second, divides by the worker's process time between the same step boundaries: with
one torch thread it equals wall time on an idle machine and is much less disturbed by other jobs on a shared one
(the default is one thread for that reason; ``--threads N`` gives both workers N). ``--repeats R`` interleaves R
runs of each trainer (alternating which goes first) and reports the median run, every run, and the load average.
Trained response tokens are counted identically for both from the batch that is actually trained: the positions
that carry a loss after the causal shift -- ours: ``loss_mask[:, 1:]`` of the distilled sequences (the trainer's
``tokens`` metric); TRL: ``labels[:, 1:] != -100`` of the ``inputs`` its ``compute_loss`` receives (after the
on-policy replacement).

TRL draws lambda once per *batch* (``random.random() <= lmbda``: the whole batch is student samples or the whole
batch is gold); so does ours since issue 16 (``policy.coin: batch``, the gkd recipe's default). The runs
recorded in bench/README.md before issue 16 drew ours once per *sequence* (``policy.coin=sequence``), so ours
generated at nearly every step (for ~half the rows) while TRL generated at ~half the steps (for all rows). With few
steps either trainer's measured fraction of on-policy steps is noisy, so the table also gives a "lambda-adjusted"
figure: mean tokens and mean seconds of its on-policy and its gold steps, weighted 50/50.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from lmdistill.models import build_model, build_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainers import add_worker_args, run_worker  # noqa: E402


def build_models(root: Path) -> None:
    tok = build_tokenizer()
    build_model("tiny-student", root / "student", tokenizer=tok, seed=0)
    build_model("tiny-teacher", root / "teacher", tokenizer=tok, seed=1)


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["summary"]["tokens_per_s"])[(len(runs) - 1) // 2]


def table(ours_runs: list[dict], trl_runs: list[dict], args) -> str:
    ours, trl = median_run(ours_runs), median_run(trl_runs)
    o, t = ours["summary"], trl["summary"]
    frac = o.get("student_row_fraction")
    oc = sorted(r["summary"]["tokens_per_cpu_s"] for r in ours_runs)[(len(ours_runs) - 1) // 2]
    tc = sorted(r["summary"]["tokens_per_cpu_s"] for r in trl_runs)[(len(trl_runs) - 1) // 2]
    lines = ["| trainer | measured steps | trained response tokens | tokens/step | wall s/step | **tokens/s (wall)** "
             "| ours / TRL (wall) | tokens per CPU-s | ours / TRL (CPU) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| lmdistill `train gkd` ({'' if frac is None else f'{100 * frac:.0f}% student rows'}) | {o['steps']} | "
             f"{o['tokens']:.0f} | {o['tokens_per_step']:.1f} | {o['s_per_step']:.3f} | **{o['tokens_per_s']:.1f}** | "
             f"**{o['tokens_per_s'] / t['tokens_per_s']:.2f}x** | {oc:.1f} | {oc / tc:.2f}x |",
             f"| TRL `GKDTrainer` ({t.get('on_policy_steps', '?')} on-policy / {t.get('gold_steps', '?')} gold steps)"
             f" | {t['steps']} | {t['tokens']:.0f} | {t['tokens_per_step']:.1f} | {t['s_per_step']:.3f} | "
             f"**{t['tokens_per_s']:.1f}** | 1.00x | {tc:.1f} | 1.00x |"]
    if "adjusted_tokens_per_s" in o:
        lines.append(f"| lmdistill, lambda-adjusted (50% on-policy steps) | | | "
                     f"{(o['on_tokens_per_step'] + o['gold_tokens_per_step']) / 2:.1f} | "
                     f"{(o['on_s_per_step'] + o['gold_s_per_step']) / 2:.3f} | {o['adjusted_tokens_per_s']:.1f} | "
                     + (f"{o['adjusted_tokens_per_s'] / t['adjusted_tokens_per_s']:.2f}x (adjusted / adjusted)"
                        if "adjusted_tokens_per_s" in t else "") + " | | |")
    if "adjusted_tokens_per_s" in t:
        lines.append(f"| TRL, lambda-adjusted (50% on-policy steps) | | | "
                     f"{(t['on_tokens_per_step'] + t['gold_tokens_per_step']) / 2:.1f} | "
                     f"{(t['on_s_per_step'] + t['gold_s_per_step']) / 2:.3f} | {t['adjusted_tokens_per_s']:.1f} | "
                     f"{o['tokens_per_s'] / t['adjusted_tokens_per_s']:.2f}x | | |")
    lines.append("")
    lines.append(f"Wall columns: the median run of {len(ours_runs)} per trainer (by wall tokens/s). CPU columns: the "
                 "median tokens per CPU-second (process time of the worker between the same step boundaries), "
                 "which a busy shared machine disturbs far less than wall time when torch runs one thread.")
    lines.append("")
    lines.append("| run | ours tokens/s | TRL tokens/s | TRL lambda-adj. | ours / TRL (wall) | ours tok/CPU-s "
                 "| TRL tok/CPU-s | ours / TRL (CPU) | load ours | load TRL |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(ours_runs, trl_runs)):
        sa, sb = a["summary"], b["summary"]
        adj = f"{sb['adjusted_tokens_per_s']:.1f}" if "adjusted_tokens_per_s" in sb else "-"
        lines.append(f"| {i + 1} | {sa['tokens_per_s']:.1f} | {sb['tokens_per_s']:.1f} | {adj} | "
                     f"{sa['tokens_per_s'] / sb['tokens_per_s']:.2f}x | {sa['tokens_per_cpu_s']:.1f} | "
                     f"{sb['tokens_per_cpu_s']:.1f} | {sa['tokens_per_cpu_s'] / sb['tokens_per_cpu_s']:.2f}x | "
                     f"{a['load'][0]:.1f} -> {a['load'][1]:.1f} | {b['load'][0]:.1f} -> {b['load'][1]:.1f} |")
    lines.append("")
    lines.append("(load: 1-minute load average before -> after the worker; the machine has "
                 f"{os.cpu_count()} cores.)")
    if "on_s_per_step" in t:
        lines.append(f"TRL (median run) on-policy steps: {t['on_tokens_per_step']:.1f} tokens in "
                     f"{t['on_s_per_step']:.3f} s; gold steps: {t['gold_tokens_per_step']:.1f} tokens in "
                     f"{t['gold_s_per_step']:.3f} s.")
    threads = {r["threads"] for run in ours_runs + trl_runs for r in run["records"]}
    lines.append(f"torch threads seen in both workers: {sorted(threads)}; warm-up steps: {args.warmup}; "
                 f"batch {args.batch}; {args.new_tokens} new tokens; "
                 "TRL gold responses: "
                 + (f"cut to {args.new_tokens} tokens." if args.trl_cut_gold else "full, like ours."))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_worker_args(p)
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs per trainer; the table shows the median")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 measured steps after 1 warm-up, batch 4, 16 new tokens, length 256, 500 rows")
    p.add_argument("--only", choices=("ours", "trl"), help="run one trainer only (print its summary)")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batch, args.new_tokens = 3, 1, 4, 16
        args.max_length, args.max_prompt, args.train_examples = 256, 128, 500

    import transformers
    import trl

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        args.root = Path(tmp)
        build_models(args.root)
        names = ("ours", "trl") if args.only is None else (args.only,)
        results: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(args.repeats):
            for name in (names if rep % 2 == 0 else names[::-1]):  # alternate the order between repeats
                try:
                    run = run_worker(name, args, args.root / f"{name}.json")
                except RuntimeError as e:
                    raise SystemExit(str(e)) from None
                results[name].append(run)
                s = run["summary"]
                print(f"[{name} #{rep + 1}] {s['tokens']:.0f} tokens in {s['seconds']:.2f} s over {s['steps']} steps"
                      f" = {s['tokens_per_s']:.1f} tokens/s, {s['tokens_per_cpu_s']:.1f} tokens/CPU-s "
                      f"(process {run['process_seconds']:.1f} s, "
                      f"load {run['load'][0]:.1f} -> {run['load'][1]:.1f})", flush=True)
    if args.only:
        for run in results[args.only]:
            print(json.dumps(run["summary"], indent=1))
        return
    head = (f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
            f"Python {platform.python_version()}, {platform.machine()}, {args.threads} torch threads, CPU float32")
    text = head + "\n\n" + table(results["ours"], results["trl"], args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
