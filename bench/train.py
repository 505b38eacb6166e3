"""Training throughput of on-policy GKD: ``lmdistill train gkd`` against TRL's ``GKDTrainer`` (issue 5).

    .venv/bin/python bench/train.py [--steps 24] [--warmup 3] [--repeats 5] [--batch 8] [--threads 1] [--quick] [--coin batch|sequence]
                                    [--out FILE.md] [--trl-cut-gold] [--only ours|trl] [--profile PREFIX]

Results and the exact commands: ``bench/README.md``.

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
batch is gold); so does ours since issue 16 (``sampling.mixed_coin: batch``, the gkd recipe's default). The runs
recorded in bench/README.md before issue 16 drew ours once per *sequence* (``sampling.mixed_coin=sequence``), so ours
generated at nearly every step (for ~half the rows) while TRL generated at ~half the steps (for all rows). With few
steps either trainer's measured fraction of on-policy steps is noisy, so the table also gives a "lambda-adjusted"
figure: mean tokens and mean seconds of its on-policy and its gold steps, weighted 50/50.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import SequentialSampler

from lmdistill.data import load_examples, tokenize_examples
from lmdistill.models import build_model, build_tokenizer
from lmdistill.train import Callback, load_config, train
from lmdistill.train.config import TrainConfig
from lmdistill.train.data_order import global_batch_indices

SEED = 42
MAX_LENGTH = 512
MAX_PROMPT = 256
LR = 5e-4


# ---------------------------------------------------------------------------------------------- shared setup
def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def build_models(root: Path) -> None:
    tok = build_tokenizer()
    build_model("tiny-student", root / "student", tokenizer=tok, seed=0)
    build_model("tiny-teacher", root / "teacher", tokenizer=tok, seed=1)


def summarise(records: list[dict], warmup: int) -> dict:
    """Throughput over the steps after ``warmup`` from per-step end times and token counts."""
    measured = records[warmup:]
    t0 = records[warmup - 1]["end"] if warmup > 0 else records[0]["start"]
    wall = measured[-1]["end"] - t0
    tokens = sum(r["tokens"] for r in measured)
    prev = t0
    for r in measured:  # per-step wall time: end of previous step to end of this one
        r["wall"] = r["end"] - prev
        prev = r["end"]
    cpu0 = records[warmup - 1]["cpu_end"] if warmup > 0 else records[0]["cpu_start"]
    cpu = measured[-1]["cpu_end"] - cpu0
    out = {"steps": len(measured), "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
           "cpu_seconds": cpu, "tokens_per_cpu_s": tokens / cpu,
           "tokens_per_step": tokens / len(measured), "s_per_step": wall / len(measured)}
    on = [r for r in measured if r.get("on_policy")]
    off = [r for r in measured if r.get("on_policy") is False]
    if on and off:
        mean = lambda xs, k: sum(x[k] for x in xs) / len(xs)  # noqa: E731
        out.update({"on_policy_steps": len(on), "gold_steps": len(off),
                    "on_tokens_per_step": mean(on, "tokens"), "on_s_per_step": mean(on, "wall"),
                    "gold_tokens_per_step": mean(off, "tokens"), "gold_s_per_step": mean(off, "wall")})
        out["adjusted_tokens_per_s"] = ((out["on_tokens_per_step"] + out["gold_tokens_per_step"])
                                        / (out["on_s_per_step"] + out["gold_s_per_step"]))
    elif on or off:
        out.update({"on_policy_steps": len(on), "gold_steps": len(off)})
    if all("student_rows" in r for r in measured):
        rows = max(sum(r["rows"] for r in measured), 1)
        out["student_row_fraction"] = sum(r["student_rows"] for r in measured) / rows
    return out


def profiled(args, fn) -> None:
    """Run ``fn``; under ``--profile PREFIX`` with cProfile, written to ``PREFIX.<worker>.prof``."""
    if not args.profile:
        fn()
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
        prof.dump_stats(f"{args.profile}.{args.worker}.prof")


# ---------------------------------------------------------------------------------------------- ours
def worker_ours(args) -> dict:
    records: list[dict] = []

    class StepTimer(Callback):
        """Per-step wall and CPU times, trained tokens, and how many rows were the student's samples."""

        def on_step_begin(self, run, step):
            self.start, self.cpu_start, self.origins = time.perf_counter(), time.process_time(), []

        def on_sequences(self, run, step, seqs):
            self.origins += [s.get("origin", "?") for s in seqs.row_stats] or ["gold"] * len(seqs.rows)

        def on_step_end(self, run, step, metrics):
            records.append({"step": step, "start": self.start, "cpu_start": self.cpu_start,
                            "end": time.perf_counter(), "cpu_end": time.process_time(),
                            "tokens": float(metrics.get("tokens", 0.0)), "skipped": bool(metrics.get("skipped")),
                            "threads": torch.get_num_threads(), "student_rows": self.origins.count("student"),
                            "rows": len(self.origins),
                            # with one coin per batch, a step is on-policy or gold as a whole (TRL's case)
                            **({"on_policy": self.origins[0] == "student"} if len(set(self.origins)) == 1 else {})})

    total = args.warmup + args.steps
    overrides = [f"student={args.root / 'student'}", f"teacher={args.root / 'teacher'}",
                 f"output_dir={args.root / 'ours'}", f"max_steps={total}", f"batch_size={args.batch}",
                 f"micro_batch_size={args.batch}", "sampling.mixed_student_prob=0.5",
                 f"sampling.mixed_coin={args.coin}",
                 "objective=[{term: jsd, weight: 1.0, beta: 0.5, temperature: 1.0}]",
                 f"sampling.max_new_tokens={args.new_tokens}", "sampling.temperature=1.0", "sampling.top_k=0",
                 "sampling.top_p=1.0", f"max_length={MAX_LENGTH}", f"max_prompt_length={MAX_PROMPT}", f"lr={LR}",
                 "weight_decay=0.01", "clip_grad=1.0", "lr_schedule=cosine", "warmup_steps=0",
                 "mixed_precision='no'", "device=cpu", "valid_data=", f"eval_steps={10 * total}",
                 f"save_steps={10 * total}", "log_steps=1", f"seed={SEED}", "progress=false"]
    cfg = load_config("gkd", overrides)
    profiled(args, lambda: train(cfg, callbacks=[StepTimer()]))
    if any(r["skipped"] for r in records):
        raise RuntimeError("ours skipped a step (non-finite loss); throughput would be wrong")
    return {"records": records}


# ---------------------------------------------------------------------------------------------- TRL
def trl_dataset(args, tokenizer):
    """Our tokenized Dolly rows in our trainer's step order, as TRL ``input_ids`` + ``completion_mask``."""
    from datasets import Dataset

    template = TrainConfig().template
    rows, _ = tokenize_examples(load_examples("dolly:train").examples, tokenizer, template=template,
                               max_prompt_length=MAX_PROMPT, max_length=MAX_LENGTH)
    total = args.warmup + args.steps
    ids, masks = [], []
    for step in range(total):
        for i in global_batch_indices(step, args.batch, len(rows), SEED):
            r = rows[i]
            resp = r.response_ids[:args.new_tokens] if args.trl_cut_gold else r.response_ids
            ids.append(r.prompt_ids + resp)
            masks.append([0] * len(r.prompt_ids) + [1] * len(resp))
    # ``prompt`` is only read by the collator when no ``completion_mask`` is given; it must exist
    return Dataset.from_dict({"input_ids": ids, "completion_mask": masks, "prompt": [""] * len(ids)})


def worker_trl(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(args.root / "student"))
    dataset = trl_dataset(args, tokenizer)
    records: list[dict] = []
    pending: dict = {}

    class Trainer(GKDTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            pending["on_policy"] = True
            return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            pending["tokens"] = pending.get("tokens", 0.0) + float((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            pending.clear()
            pending["start"], pending["cpu_start"] = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            records.append({"step": state.global_step - 1, "start": pending["start"],
                            "cpu_start": pending["cpu_start"], "end": time.perf_counter(),
                            "cpu_end": time.process_time(),
                            "tokens": pending.get("tokens", 0.0), "on_policy": bool(pending.get("on_policy")),
                            "threads": torch.get_num_threads()})

    total = args.warmup + args.steps
    config = GKDConfig(
        output_dir=str(args.root / "trl"), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=total, learning_rate=LR, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="cosine",
        warmup_steps=0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        lmbda=0.5, beta=0.5, temperature=1.0, max_new_tokens=args.new_tokens, seq_kd=False,
        max_length=MAX_LENGTH, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=SEED, data_seed=SEED, disable_dropout=True,
    )
    student = AutoModelForCausalLM.from_pretrained(str(args.root / "student"), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(str(args.root / "teacher"), dtype=torch.float32)
    trainer = Trainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[Timer()])
    profiled(args, trainer.train)
    return {"records": records}


# ---------------------------------------------------------------------------------------------- driver
def run_worker(name: str, args, result: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--worker", name, "--root", str(args.root), "--result", str(result),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--coin", args.coin]
    if args.trl_cut_gold:
        cmd.append("--trl-cut-gold")
    if args.profile:
        cmd += ["--profile", args.profile]
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{name} worker failed (exit {proc.returncode})")
    out = json.loads(result.read_text())
    out["process_seconds"] = time.perf_counter() - t
    out["load"] = (load_before, os.getloadavg()[0])
    out["summary"] = summarise(out["records"], args.warmup)
    return out


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
    p.add_argument("--steps", type=int, default=24, help="measured optimiser steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps, not measured")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads in both workers")
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs per trainer; the table shows the median")
    p.add_argument("--quick", action="store_true", help="4 measured steps after 1 warm-up step")
    p.add_argument("--trl-cut-gold", action="store_true",
                   help="cut TRL's gold responses to --new-tokens (ours always trains on full gold responses)")
    p.add_argument("--coin", choices=("batch", "sequence"), default="batch",
                   help="ours' GKD coin: one per batch (TRL's rule, the default) or one per sequence")
    p.add_argument("--only", choices=("ours", "trl"), help="run one trainer only (print its summary)")
    p.add_argument("--profile", metavar="PREFIX", help="cProfile each worker into PREFIX.ours.prof / PREFIX.trl.prof")
    p.add_argument("--out", help="also write the table to this markdown file")
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup = 4, 1

    if args.worker:
        set_threads(args.threads)
        out = worker_ours(args) if args.worker == "ours" else worker_trl(args)
        args.result.write_text(json.dumps(out))
        return

    import transformers
    import trl

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        args.root = Path(tmp)
        build_models(args.root)
        names = ("ours", "trl") if args.only is None else (args.only,)
        results: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(args.repeats):
            for name in (names if rep % 2 == 0 else names[::-1]):  # alternate the order between repeats
                run = run_worker(name, args, args.root / f"{name}.json")
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
