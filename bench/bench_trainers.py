"""The two trainers the training benchmarks time, each in its own subprocess: ``lmdistill train`` and TRL's
``GKDTrainer`` (used by ``train.py`` on the CPU and ``gpu_check.py`` on a GPU; not a benchmark itself).

``run_worker(name, args, result)`` starts ``python bench/bench_trainers.py --worker ours|trl ...`` with the fields of
``args`` (``add_worker_args``) and returns its per-step records, its peak memory and their summary. The models are
``args.root / "student"`` and ``args.root / "teacher"``.

Both trainers see the same rows in the same order (our tokenizer, template, length filter and step order), with the
same optimiser, schedule, precision and device:

- ``--recipe gkd``: ours ``train gkd`` (generalized JSD beta ``--beta``, ``policy.student_prob=--lmbda``,
  one coin per batch or ``--coin sequence``) against TRL ``lmbda=--lmbda, beta=--beta``.
- ``--recipe kd``: ours ``train kd`` with the objective cut to forward KL alone (no SFT mix) against TRL
  ``lmbda=0, beta=0``: TRL's ``generalized_jsd_loss`` with ``beta == 0`` is ``KL(teacher || student)``, forward KL
  (trl/experimental/gkd/gkd_trainer.py, ``generalized_jsd_loss``).
- ``--precision bf16``: ours ``mixed_precision=bf16 teacher_dtype=bfloat16``; TRL ``bf16=True`` with the teacher
  loaded in bfloat16. Student weights stay float32 in both (autocast).
- A teacher whose vocabulary is longer than the student's (Qwen2.5 7B's 152,064 rows against 0.5B's 151,936): ours
  compares the shared prefix; TRL refuses different sizes (``GKDTrainer.__init__``: "requires a shared
  vocabulary"), so its teacher is cut to the student's rows (``resize_token_embeddings``), the same distribution.

Per step: wall and CPU time at the step's end (a CUDA synchronise first), trained response tokens (the positions
that carry a loss after the causal shift: ours ``loss_mask[:, 1:]`` of the distilled sequences, TRL ``labels[:, 1:]
!= -100``), computed positions (``input_ids`` elements of what the models ran over, padding included) and whether
the step was on-policy. The peak memory is ``torch.cuda.max_memory_allocated`` on CUDA, else the peak RSS.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import SequentialSampler

from lmdistill.data import load_examples, tokenize_examples
from lmdistill.train import Callback, load_config, train
from lmdistill.train.data_order import global_batch_indices

SEED = 42
LR = 5e-4
TEMPLATE = "alpaca"   # named, not the config's default: both trainers must format the rows alike


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """The settings both trainers share (the benchmark's own flags add to these)."""
    p.add_argument("--steps", type=int, default=24, help="measured optimiser steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps, not measured")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads in both workers")
    p.add_argument("--coin", choices=("batch", "sequence"), default="batch",
                   help="ours' GKD coin: one per batch (TRL's rule, the default) or one per sequence")
    p.add_argument("--trl-cut-gold", action="store_true",
                   help="cut TRL's gold responses to --new-tokens (ours always trains on full gold responses)")
    p.add_argument("--recipe", choices=("gkd", "kd"), default="gkd")
    p.add_argument("--lmbda", type=float, default=0.5, help="GKD: probability that a batch is the student's samples")
    p.add_argument("--beta", type=float, default=0.5, help="GKD: generalized JSD's beta")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--chunked-loss", action="store_true", help="ours: chunked_loss=true (token-chunked LM head)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--train-examples", type=int, default=0,
                   help="the first N Dolly training examples (0: all; fewer tokenize faster)")
    p.add_argument("--profile", metavar="PREFIX", help="cProfile each worker into PREFIX.ours.prof / PREFIX.trl.prof")


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


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
           "tokens_per_step": tokens / len(measured), "s_per_step": wall / len(measured),
           "positions_per_s": sum(r.get("positions", 0) for r in measured) / wall}
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


def step_end(args) -> tuple[float, float]:
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def peak_memory(args) -> dict:
    if args.device == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "memory": "cuda max_memory_allocated"}
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "memory": "peak RSS"}


def fresh_dir(args) -> Path:
    """A new output folder under ``root`` for this run (a run folder belongs to one run: lmdistill refuses another)."""
    return Path(tempfile.mkdtemp(prefix=f"{args.worker}-{args.recipe}-", dir=args.root))


# ---------------------------------------------------------------------------------------------- ours
def ours_overrides(args) -> tuple[str, list[str]]:
    """The recipe and the overrides of our run (``lmdistill train RECIPE *overrides``)."""
    total = args.warmup + args.steps
    common = [f"student={args.root / 'student'}", f"teacher={args.root / 'teacher'}",
              f"output_dir={fresh_dir(args)}", f"max_steps={total}", f"batch_size={args.batch}",
              f"micro_batch_size={args.batch}", f"template={TEMPLATE}", f"max_length={args.max_length}",
              f"max_prompt_length={args.max_prompt}", f"max_train_examples={args.train_examples}", f"lr={LR}",
              "weight_decay=0.01", "clip_grad=1.0", "lr_schedule=cosine", "warmup_steps=0", f"device={args.device}",
              f"mixed_precision={'bf16' if args.precision == 'bf16' else 'no'}",
              f"teacher_dtype={'bfloat16' if args.precision == 'bf16' else 'float32'}",
              f"chunked_loss={str(args.chunked_loss).lower()}", "valid_data=", f"eval_steps={10 * total}",
              f"save_steps={10 * total}", "log_steps=1", f"seed={SEED}", "progress=false"]
    if args.recipe == "kd":   # forward KL alone: TRL's beta = 0
        return "kd", common + ["objective=[{term: fkl, weight: 1.0, temperature: 1.0}]"]
    return "gkd", common + [f"policy.student_prob={args.lmbda}", f"policy.coin={args.coin}",
                            f"objective=[{{term: jsd, weight: 1.0, beta: {args.beta}, temperature: 1.0}}]",
                            f"sampling.max_new_tokens={args.new_tokens}", "sampling.temperature=1.0",
                            "sampling.top_k=0", "sampling.top_p=1.0"]


def worker_ours(args) -> dict:
    records: list[dict] = []

    class StepTimer(Callback):
        """Per-step wall and CPU times, trained tokens, positions, and how many rows were the student's samples."""

        def on_step_begin(self, run, step):
            self.start, self.cpu_start, self.origins, self.positions = *step_end(args), [], 0

        def on_sequences(self, run, step, seqs):
            self.origins += [s.get("origin", "?") for s in seqs.row_stats] or ["gold"] * len(seqs.rows)
            self.positions += seqs.batch["input_ids"].numel()

        def on_step_end(self, run, step, metrics):
            end, cpu_end = step_end(args)
            records.append({"step": step, "start": self.start, "cpu_start": self.cpu_start, "end": end,
                            "cpu_end": cpu_end, "tokens": float(metrics.get("tokens", 0.0)),
                            "loss": float(metrics.get("loss", float("nan"))), "positions": self.positions,
                            "skipped": bool(metrics.get("skipped")), "threads": torch.get_num_threads(),
                            "student_rows": self.origins.count("student"), "rows": len(self.origins),
                            # with one coin per batch, a step is on-policy or gold as a whole (TRL's case)
                            **({"on_policy": self.origins[0] == "student"} if len(set(self.origins)) == 1 else {})})

    recipe, overrides = ours_overrides(args)
    cfg = load_config(recipe, overrides)
    profiled(args, lambda: train(cfg, callbacks=[StepTimer()]))
    if any(r["skipped"] for r in records):
        raise RuntimeError("ours skipped a step (non-finite loss); throughput would be wrong")
    return {"records": records, **peak_memory(args)}


# ---------------------------------------------------------------------------------------------- TRL
def trl_dataset(args, tokenizer):
    """Our tokenized Dolly rows in our trainer's step order, as TRL ``input_ids`` + ``completion_mask``."""
    from datasets import Dataset

    examples = load_examples("dolly:train").examples[:args.train_examples or None]   # as max_train_examples cuts
    rows, _ = tokenize_examples(examples, tokenizer, template=TEMPLATE,
                               max_prompt_length=args.max_prompt, max_length=args.max_length)
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


def trl_models(args):
    """Student (float32) and teacher (bfloat16 under ``--precision bf16``), the teacher cut to the student's rows."""
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    student = AutoModelForCausalLM.from_pretrained(str(args.root / "student"), dtype=torch.float32).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(
        str(args.root / "teacher"), dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32).to(device)
    rows = student.get_output_embeddings().weight.shape[0]
    if teacher.get_output_embeddings().weight.shape[0] != rows:
        teacher.resize_token_embeddings(rows)
    return student, teacher


def worker_trl(args) -> dict:
    from transformers import AutoTokenizer, TrainerCallback

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
            pending["positions"] = pending.get("positions", 0) + inputs["input_ids"].numel()
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            pending.clear()
            pending["start"], pending["cpu_start"] = step_end(args)

        def on_step_end(self, a, state, control, **kw):
            end, cpu_end = step_end(args)
            records.append({"step": state.global_step - 1, "start": pending["start"],
                            "cpu_start": pending["cpu_start"], "end": end, "cpu_end": cpu_end,
                            "tokens": pending.get("tokens", 0.0), "positions": pending.get("positions", 0),
                            "on_policy": bool(pending.get("on_policy")), "threads": torch.get_num_threads()})

    total = args.warmup + args.steps
    kd = args.recipe == "kd"
    config = GKDConfig(
        output_dir=str(fresh_dir(args)), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=total, learning_rate=LR, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="cosine",
        warmup_steps=0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        lmbda=0.0 if kd else args.lmbda, beta=0.0 if kd else args.beta, temperature=1.0,
        max_new_tokens=args.new_tokens, seq_kd=False, max_length=args.max_length, gradient_checkpointing=False,
        bf16=args.precision == "bf16", fp16=False, use_cpu=args.device == "cpu",
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=SEED, data_seed=SEED, disable_dropout=True,
    )
    student, teacher = trl_models(args)
    trainer = Trainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[Timer()])
    profiled(args, trainer.train)
    return {"records": records, **peak_memory(args)}


# ---------------------------------------------------------------------------------------------- driver
def worker_command(name: str, args, result: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--root", str(args.root),
           "--result", str(result)]
    for flag in ("steps", "warmup", "batch", "threads", "new_tokens", "coin", "recipe", "lmbda", "beta", "device",
                 "precision", "max_length", "max_prompt", "train_examples"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for flag in ("trl_cut_gold", "chunked_loss"):
        if getattr(args, flag):
            cmd.append(f"--{flag.replace('_', '-')}")
    if args.profile:
        cmd += ["--profile", args.profile]
    return cmd


def run_worker(name: str, args, result: Path, timeout: float | None = None) -> dict:
    """One worker in its own process; its records, peak memory, wall time, load and summary. A failure (or
    ``timeout`` seconds passing) raises ``RuntimeError`` with the end of its output."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TRL_EXPERIMENTAL_SILENCE": "1"}
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    try:
        proc = subprocess.run(worker_command(name, args, result), env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{name} worker did not finish within {timeout:.0f} s") from None
    if proc.returncode:
        tail = [x for x in (proc.stderr or proc.stdout).strip().splitlines() if x.strip()]
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-6000:])
        raise RuntimeError(f"{name} worker failed (exit {proc.returncode}): {tail[-1][:300] if tail else ''}")
    out = json.loads(result.read_text())
    out["process_seconds"] = time.perf_counter() - t
    out["load"] = (load_before, os.getloadavg()[0])
    out["summary"] = summarise(out["records"], args.warmup)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_worker_args(p)
    p.add_argument("--worker", choices=("ours", "trl"), required=True)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args()
    set_threads(args.threads)
    out = worker_ours(args) if args.worker == "ours" else worker_trl(args)
    args.result.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
