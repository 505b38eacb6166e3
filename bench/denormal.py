"""Training speed with and without flushing subnormal floats to zero (``lmdistill.runtime.flush_denormals``).

    .venv/bin/python bench/denormal.py [--checkpoint DIR] [--steps 40] [--repeats 3] [--threads N]

A model that has trained for a while produces subnormal floats (softmax tails, Adam's second moments), and x86
CPUs compute on them many times slower. The ``lmdistill`` executable flushes them to zero; this benchmark resumes
one training checkpoint for ``--steps`` more steps with ``LMDISTILL_FLUSH_DENORMAL=0`` (the baseline) and ``=1``,
each in its own ``lmdistill train ... --resume`` process on a fresh copy of the run, ``--repeats`` times
alternating which goes first, and prints seconds per step (wall time of the resumed steps, from the trainer's own
throughput log; loading, validation and saving excluded) and the ratio.

The default checkpoint is the newest one of the demo's cached teacher (``make demo`` writes it:
``runs/demo/**/cache/teacher-*/checkpoints/step-*``, tiny-teacher after 1000 SFT steps on Dolly).

``--quick``: a smoke run (``make bench-smoke``) that needs no demo: tiny-student trains 2 SFT steps on 64 Dolly rows
in this process (length 128) and its step-2 checkpoint is resumed for 2 steps each way, once. A fresh model has few
subnormals, so its ratio means nothing; the paths (the resumed run, the trainer's throughput log) are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def default_checkpoint() -> Path:
    found = sorted(ROOT.glob("runs/demo/**/cache/teacher-*/checkpoints/step-*"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit("no checkpoint given and none under runs/demo/**/cache: run `make demo` first, or pass "
                         "--checkpoint RUN_DIR/checkpoints/step-N of any `lmdistill train` run")
    return found[-1]


def quick_checkpoint(work: Path) -> Path:
    """A 2-step SFT run of tiny-student (64 Dolly rows, length 128) and its step-2 checkpoint."""
    from lmdistill.models import build_model
    from lmdistill.train import load_config, train

    build_model("tiny-student", work / "student", seed=0)
    train(load_config("sft", [f"student={work / 'student'}", f"output_dir={work / 'run'}", "max_steps=2",
                              "save_steps=2", "batch_size=4", "micro_batch_size=4", "max_length=128",
                              "max_prompt_length=96", "max_train_examples=64", "valid_data=", "eval_steps=100",
                              "device=cpu", "template=alpaca", "progress=false"]))
    return work / "run" / "checkpoints" / "step-0000002"


def seconds_per_step(run_dir: Path, first_new_step: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    new = [r for r in rows if r.get("step", 0) >= first_new_step and "tokens" in r]
    last = new[-1]  # tokens_per_s is the running mean since the resume: elapsed = tokens / tokens_per_s
    return sum(r["tokens"] for r in new) / last["tokens_per_s"] / len(new)


def resume_once(checkpoint: Path, steps: int, flush: bool, threads: int | None) -> float:
    run_src = checkpoint.parent.parent
    start = int(checkpoint.name.split("-")[-1])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        shutil.copytree(run_src, run_dir, ignore=shutil.ignore_patterns("tb", "best", "final"))
        env = dict(os.environ, LMDISTILL_FLUSH_DENORMAL="1" if flush else "0")
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        config = json.loads((run_dir / "config.json").read_text())
        for key in ("filters", "world_size"):  # written beside the settings, not settings themselves
            config.pop(key, None)
        recipe = Path(tmp) / "recipe.yaml"  # JSON is YAML
        recipe.write_text(json.dumps(config))
        far = 10 ** 9
        cmd = [sys.executable, "-m", "lmdistill", "train", str(recipe), f"output_dir={run_dir}",
               f"max_steps={start + steps}", f"save_steps={far}", f"eval_steps={far}", "progress=false",
               "--resume", str(run_dir / "checkpoints" / checkpoint.name)]
        subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return seconds_per_step(run_dir, start + 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="RUN_DIR/checkpoints/step-N of a training run")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the training processes")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: a 2-step tiny-student checkpoint made here, resumed 2 steps each way, once")
    args = ap.parse_args(argv)
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="bench-denormal-") as tmp:
            args.checkpoint, args.steps, args.repeats, args.threads = quick_checkpoint(Path(tmp)), 2, 1, 1
            return measure(args)
    return measure(args)


def measure(args) -> int:
    checkpoint = (args.checkpoint or default_checkpoint()).resolve()
    times = {False: [], True: []}
    for r in range(args.repeats):
        for flush in ((False, True) if r % 2 == 0 else (True, False)):
            times[flush].append(resume_once(checkpoint, args.steps, flush, args.threads))
            print(f"run {r + 1}, flush={flush}: {times[flush][-1]:.3f} s/step", file=sys.stderr)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    cpu = platform.processor() or platform.machine()
    print(f"Checkpoint {checkpoint} resumed for {args.steps} steps, {args.repeats} runs each (alternating), "
          f"{cpu}, threads: {args.threads or 'default'}.\n")
    print("| subnormals | s/step (median) | runs (s/step) | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| kept (`LMDISTILL_FLUSH_DENORMAL=0`, baseline) | {off:.3f} | "
          f"{', '.join(f'{t:.3f}' for t in times[False])} | 1.00x |")
    print(f"| flushed to zero (the default) | {on:.3f} | {', '.join(f'{t:.3f}' for t in times[True])} "
          f"| **{off / on:.2f}x** |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
