"""Where `make demo` (the `full` preset) spends its time, part by part, on short runs that mimic each phase.

    .venv/bin/python bench/demo_time.py padding
    .venv/bin/python bench/demo_time.py teacher [--steps 9]
    .venv/bin/python bench/demo_time.py students [--steps 8] [--methods sft,kd,...]
    .venv/bin/python bench/demo_time.py eval [--models teacher,student] [--benchmarks dolly,...]
    .venv/bin/python bench/demo_time.py --quick       # every part, smoke-sized (make bench-smoke)

Every part runs with ``--threads`` torch threads (default 1) and reports CPU seconds (process time), which a busy
shared machine disturbs far less than wall time when torch runs one thread (with two threads on two busy cores a
step slowed down 2.5x, bench/README.md). Variants are interleaved, so they see the same machine load.

- ``padding``: real tokens / computed positions of the teacher's SFT batches (1000 steps, batch 16, length 160)
  as they are, split over 2 processes, and cut into length-sorted micro-batches; and of the evaluation's prefill
  (first 100 examples per benchmark, batch 32) in file order and sorted by prompt length.
- ``teacher``: CPU seconds per SFT step of tiny-teacher at the full preset's batch and lengths: one micro-batch of
  16 (before), 2 x 8 and 4 x 4 micro-batches of rows sorted by length (``micro_batch_order=length``).
- ``students``: one run per method and ablation at the full preset's settings: set-up, one validation, seconds per
  step (steps spread over the 120), the generation's share, saving; and the estimate of a 120-step run.
- ``eval``: one model on each benchmark, 100 examples, one seed, 128 new tokens, batch 32, prompts in file order
  (before) and sorted by length; counts the predictions that differ.

The models are built in ``--work`` (a 30-step SFT teacher, so that generation stops at EOS as a trained model does,
and the initial student), unless ``--teacher`` / ``--student`` name others.

``--quick``: every part in one run, in a temporary ``--work``: a 2-step teacher, 1 timed teacher step, 2 steps of the
methods sft and gkd, evaluation of the teacher on Dolly (8 examples, 8 new tokens); a smoke run whose figures mean
nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmdistill.demo import ABLATIONS, DEMO_OVERRIDES, METHODS, PRESETS, _common
from lmdistill.models import build_model
from lmdistill.train import load_config, train
from lmdistill.train.run import Run

P = PRESETS["full"]
BENCHMARKS = P.benchmarks
PARTS = ("padding", "teacher", "students", "eval")


def models(args) -> tuple[Path, Path, Path]:
    """(teacher init, a 30-step SFT teacher, student init)."""
    work = Path(args.work)
    t_init, s_init = work / "teacher-init", work / "student-init"
    if not (t_init / "config.json").exists():
        build_model(P.teacher_size, t_init, seed=0)
    if not (s_init / "config.json").exists():
        build_model(P.student_size, s_init, seed=0)
    teacher = Path(args.teacher) if args.teacher else work / f"teacher-{args.teacher_steps}" / "final"
    if not (teacher / "config.json").exists():
        cfg = load_config("sft", [f"student={t_init}", *_common(P, teacher.parent, args.teacher_steps, P.teacher_lr),
                                  "progress=false"])
        train(cfg)
    return t_init, teacher, Path(args.student) if args.student else s_init


def padding(args) -> None:
    from lmdistill.data import load_examples, tokenize_examples
    from lmdistill.models import load_tokenizer
    from lmdistill.train.data_order import global_batch_indices

    _, teacher, _ = models(args)
    tok = load_tokenizer(str(teacher))
    rows, _ = tokenize_examples(load_examples("dolly:train").examples, tok, max_prompt_length=P.max_prompt_length,
                                max_length=P.max_length)
    lengths = [len(r.input_ids) for r in rows]
    real, comp = 0, {"one batch of 16": 0, "2 processes x 8 (rank slices)": 0}
    for k in (2, 4):
        comp[f"{k} length-sorted micro-batches of {P.batch_size // k}"] = 0
    for step in range(P.teacher_steps):
        ls = [lengths[i] for i in global_batch_indices(step, P.batch_size, len(rows), 42)]
        real += sum(ls)
        comp["one batch of 16"] += len(ls) * max(ls)
        comp["2 processes x 8 (rank slices)"] += sum(len(ls[r::2]) * max(ls[r::2]) for r in range(2))
        srt = sorted(ls)
        for k in (2, 4):
            m = P.batch_size // k
            comp[f"{k} length-sorted micro-batches of {m}"] += sum(m * max(srt[j:j + m]) for j in range(0, len(srt), m))
    print(f"teacher SFT, {P.teacher_steps} steps of {P.batch_size} rows, length {P.max_length}: real tokens / "
          "computed positions")
    for name, c in comp.items():
        print(f"  {name}: {real / c:.3f}")
    print("evaluation prefill (first 100 examples, batch 32, prompts cut at 256): real / computed")
    for bench in BENCHMARKS:
        ex = load_examples(bench).examples[:P.eval_limit]
        toks, _ = tokenize_examples(ex, tok, max_prompt_length=10 ** 9, with_response=False)
        ls = [min(len(t.prompt_ids), 256) for t in toks]

        def share(xs):
            return sum(xs) / sum(max(xs[i:i + 32]) * len(xs[i:i + 32]) for i in range(0, len(xs), 32))
        print(f"  {bench}: file order {share(ls):.2f}, sorted by length {share(sorted(ls)):.2f}")


def teacher_steps(args) -> None:
    t_init, _, _ = models(args)
    variants = {"16 in one micro-batch (before)": ["micro_batch_size=16"],
                "2 x 8, sorted by length (now)": ["micro_batch_size=8", "micro_batch_order=length"],
                "4 x 4, sorted by length": ["micro_batch_size=4", "micro_batch_order=length"]}
    runs = {name: Run(load_config("sft", [f"student={t_init}", *_common(P, Path(args.work) / "t", P.teacher_steps,
                                                                        P.teacher_lr), *extra, "progress=false"]))
            for name, extra in variants.items()}
    cpu = {name: [] for name in variants}
    for step in range(args.steps + 1):
        for name, run in runs.items():
            c = time.process_time()
            run.step(step)
            if step:   # the first step warms up
                cpu[name].append(time.process_time() - c)
    base = statistics.median(cpu[next(iter(cpu))])
    for name, xs in cpu.items():
        m = statistics.median(xs)
        print(f"  {name}: {m:.3f} CPU s/step (median of {len(xs)}), {m / base:.2f}x")
    first = dict(next(iter(runs.values())).unwrapped().named_parameters())
    for name, run in list(runs.items())[1:]:
        other = dict(run.unwrapped().named_parameters())
        diff = max(float((first[k] - other[k]).detach().abs().max()) for k in first)
        print(f"  max |weight difference| after {args.steps + 1} steps, {name} vs before: {diff:.2e}")


def students(args) -> None:
    import lmdistill.train.sequences as sequences

    _, teacher, s_init = models(args)
    total = 0.0
    for method in args.methods.split(","):
        recipe, extra = ABLATIONS.get(method, (method, []))
        over = [f"student={s_init}", f"teacher={teacher}", *_common(P, Path(args.work) / f"s-{method}",
                                                                     P.student_steps, P.student_lr, P.student_batch),
                f"sampling.max_new_tokens={P.max_new_tokens}", *DEMO_OVERRIDES.get(recipe, []), *extra,
                f"method={method}", "progress=false"]
        c = time.process_time()
        run = Run(load_config(recipe, over))
        setup = time.process_time() - c
        c = time.process_time()
        run.validate(0)
        val = time.process_time() - c
        gen = [0.0]
        real = sequences.GeneratedSequences.generated

        def timed(self, *a, **k):
            t = time.process_time()
            out = real(self, *a, **k)
            gen[0] += time.process_time() - t
            return out

        sequences.GeneratedSequences.generated = timed
        steps = []
        try:
            for step in [i * P.student_steps // args.steps for i in range(args.steps)]:
                c = time.process_time()
                run.step(step)
                steps.append(time.process_time() - c)
        finally:
            sequences.GeneratedSequences.generated = real
        c = time.process_time()
        run.save(P.student_steps)
        run.export("final")
        save = time.process_time() - c
        step = statistics.fmean(steps)
        validations = 4 + int(run.source.needs_initial_validation)   # eval_steps = steps // 4, + step 0 for replay
        est = setup + validations * val + P.student_steps * step + save
        total += est
        print(f"  {method}: set-up {setup:.1f} s, validation {val:.2f} s, step {step:.3f} s (generation "
              f"{gen[0] / args.steps:.3f}), save+export {save:.2f} s; 120-step run ~{est:.0f} CPU s "
              f"(validation {validations * val / est:.0%})", flush=True)
    print(f"  all runs: ~{total:.0f} CPU s")


def evaluation(args) -> None:
    import lmdistill.evaluate.run as run_mod

    _, teacher, s_init = models(args)
    paths = {"teacher": teacher, "student": s_init}
    length_order = run_mod.length_order
    orders = {"file order (before)": lambda items: list(range(len(items))), "sorted by length (now)": length_order}
    limit, new_tokens = args.eval_limit or P.eval_limit, args.eval_tokens or P.eval_max_new_tokens
    for name in args.models.split(","):
        cpu, outs = {}, {}
        for bench in args.benchmarks.split(","):
            for label, order in orders.items():
                run_mod.length_order = order
                out = Path(args.work) / "eval"
                shutil.rmtree(out, ignore_errors=True)
                c = time.process_time()
                run_mod.evaluate_models([f"m={paths[name]}"], [bench], [10], out, batch_size=32, limit=limit,
                                        max_new_tokens=new_tokens, device="cpu", progress=False)
                cpu[(bench, label)] = time.process_time() - c
                outs[(bench, label)] = [json.loads(x)["output"] for x in
                                        (out / "predictions" / "m" / bench / "seed10.jsonl").read_text().splitlines()]
        run_mod.length_order = length_order
        a, b = orders
        for bench in args.benchmarks.split(","):
            diff = sum(x != y for x, y in zip(outs[(bench, a)], outs[(bench, b)]))
            print(f"  {name} / {bench}: {cpu[(bench, a)]:.1f} -> {cpu[(bench, b)]:.1f} CPU s "
                  f"({cpu[(bench, a)] / cpu[(bench, b)]:.2f}x); {diff} of {len(outs[(bench, a)])} predictions differ")
        ta = sum(v for (_, lab), v in cpu.items() if lab == a)
        tb = sum(v for (_, lab), v in cpu.items() if lab == b)
        print(f"  {name}, all: {ta:.1f} -> {tb:.1f} CPU s ({ta / tb:.2f}x)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", nargs="?", choices=PARTS, help="required unless --quick")
    ap.add_argument("--steps", type=int, default=0, help="teacher: timed steps (9); students: steps per run (8)")
    ap.add_argument("--methods", default=",".join([*METHODS, *ABLATIONS]))
    ap.add_argument("--models", default="teacher,student")
    ap.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher", default="", help="a trained teacher folder (default: 30 SFT steps, built here)")
    ap.add_argument("--student", default="", help="the student to evaluate (default: the initial tiny-student)")
    ap.add_argument("--work", default="runs/bench-demo-time")
    ap.add_argument("--teacher-steps", type=int, default=30, help="SFT steps of the teacher built in --work")
    ap.add_argument("--eval-limit", type=int, default=0, help="eval: examples per benchmark (default: the preset's)")
    ap.add_argument("--eval-tokens", type=int, default=0, help="eval: new tokens (default: the preset's)")
    ap.add_argument("--quick", action="store_true", help="every part, smoke-sized, in a temporary folder")
    args = ap.parse_args()
    if not args.quick and args.part is None:
        ap.error(f"a part is required (one of {', '.join(PARTS)}) unless --quick")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)   # as the lmdistill executable does
    if not args.quick:
        return run_part(args, args.part)
    with tempfile.TemporaryDirectory(prefix="bench-demo-time-") as tmp:
        args.work, args.teacher_steps, args.eval_limit, args.eval_tokens = tmp, 2, 8, 8
        args.methods, args.models, args.benchmarks = "sft,gkd", "teacher", "dolly"
        for part in PARTS:
            args.steps = 1 if part == "teacher" else 2
            run_part(args, part)


def run_part(args, part: str) -> None:
    args.steps = args.steps or (9 if part == "teacher" else 8)
    print(f"bench/demo_time.py {part}: torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
          file=sys.stderr)
    {"padding": padding, "teacher": teacher_steps, "students": students, "eval": evaluation}[part](args)


if __name__ == "__main__":
    main()
