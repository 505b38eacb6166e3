"""``lmdistill demo``: the whole product on this machine, no downloads.

1. build the tokenizer and train ``tiny-teacher`` on Dolly train with SFT (cached: a second run reuses it);
2. initialise ``tiny-student`` once and distill it with each method from the same weights and data order;
3. evaluate teacher and students with the paper protocol (sampling, T = 1) over 3 seeds;
4. write ``report.md`` with the table, the training curves and the benchmark chart, and say which methods beat
   SFT by more than their sampling noise.

Everything goes under the output folder ``OUT`` (``OUT/report.md``, ``OUT/methods/NAME``, ``OUT/eval``, the teacher
cache ``OUT/cache``). A folder belongs to one preset: ``OUT/demo-preset.json`` records it when the demo starts,
and a demo of other settings into it is refused (it would reuse the other preset's students).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from lmdistill.errors import ConfigError
from lmdistill.evaluate.report import AVERAGE, markdown_table
from lmdistill.evaluate.run import evaluate_models
from lmdistill.io import write_json, write_text
from lmdistill.models import build_model
from lmdistill.runtime import available_cpus, worker_pool
from lmdistill.train import load_config, train
from lmdistill.train.metrics_log import plot_curves

METHODS = ("sft", "kd", "seqkd", "gkd", "distillm", "switch", "mgsr")

#: MGSR with one part taken out at a time (report rows "what each part does"): the recipe and its overrides.
ABLATIONS = {
    "mgsr-no-scrg": ("mgsr", ["policy.generator=student"]),                            # plain student samples
    "mgsr-no-dackl": ("mgsr", ["objective.dac_kl.weight=0", "objective.fkl.weight=1"]),  # plain KL for DAC-KL
    "mgsr-no-span": ("mgsr", ["objective.span.weight=0"]),
}

PART_NAMES = {"scrg": "SCRG", "dackl": "DAC-KL", "span": "Span correlation"}

#: The student runs' relative costs on the `full` preset (seconds of each run on one thread, 2026-12-07, bench/README.md
#: "Demo time"): the worker pool takes the costliest first, so the last run to finish is a short one. Only the order
#: matters; unknown names go last.
RUN_COST = {"mgsr": 126, "mgsr-no-dackl": 126, "mgsr-no-span": 100, "mgsr-no-scrg": 100, "switch": 87, "seqkd": 69,
            "gkd": 63, "distillm": 60, "kd": 58, "sft": 30}

#: The demo's CPU-budget departures from the recipes (printed in the report). DistiLLM's threshold starts at 0
#: and rises only when the validation loss rises by 0.1 over ~20 epochs (finetune.py:265, 411-417); in the
#: demo's few steps it would never rise, so DistiLLM would be KD and MGSR would never run SCRG.
DEMO_OVERRIDES = {"distillm": ["policy.init_threshold=0.5"], "mgsr": ["policy.init_threshold=0.5"]}


@dataclass(frozen=True)
class Preset:
    teacher_steps: int
    teacher_lr: float
    student_steps: int
    student_lr: float
    batch_size: int
    max_length: int
    max_prompt_length: int
    max_new_tokens: int           # on-policy generation during training
    benchmarks: tuple[str, ...]
    eval_limit: int               # examples per benchmark
    eval_max_new_tokens: int
    seeds: tuple[int, ...] = (10, 20, 30)
    methods: tuple[str, ...] = METHODS
    ablations: tuple[str, ...] = tuple(ABLATIONS)
    teacher_size: str = "tiny-teacher"
    student_size: str = "tiny-student"
    train_examples: int = 0       # 0 = all of Dolly train
    student_batch_size: int = 0   # 0 = batch_size (the teacher's)

    @property
    def student_batch(self) -> int:
        return self.student_batch_size or self.batch_size


PRESETS = {
    "quick": Preset(teacher_steps=60, teacher_lr=3e-3, student_steps=12, student_lr=2e-3, batch_size=8, max_length=96,
                    max_prompt_length=64, max_new_tokens=16, benchmarks=("dolly",), eval_limit=40,
                    eval_max_new_tokens=48, train_examples=2000),
    "full": Preset(teacher_steps=400, teacher_lr=3e-3, student_steps=100, student_lr=2e-3, batch_size=16,
                   student_batch_size=8,
                   max_length=160, max_prompt_length=96, max_new_tokens=32,
                   benchmarks=("dolly", "selfinst", "vicuna", "sni", "unni"), eval_limit=100,
                   eval_max_new_tokens=128),
}


def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _common(p: Preset, out: Path, steps: int, lr: float, batch: int | None = None) -> list[str]:
    batch = batch or p.batch_size
    return [f"output_dir={out}", f"max_steps={steps}", f"lr={lr}", f"batch_size={batch}",
            f"micro_batch_size={batch}", f"max_length={p.max_length}",
            f"max_prompt_length={p.max_prompt_length}", f"max_train_examples={p.train_examples}",
            f"save_steps={steps}", f"eval_steps={max(1, steps // 4)}", "eval_limit=16", "eval_max_new_tokens=32",
            f"warmup_steps={max(1, steps // 20)}", "progress=true", "seed=42",
            "template=alpaca"]   # the evaluation protocol's template (auto would pick the tiny tokenizer's chat one)


def build_teacher(p: Preset, cache: Path) -> Path:
    """Train (or reuse) the SFT teacher; the cache key covers every setting that changes it."""
    micro = p.batch_size // 2 if p.batch_size % 2 == 0 else p.batch_size
    settings = {"size": p.teacher_size, "steps": p.teacher_steps, "lr": p.teacher_lr, "batch": p.batch_size,
                "len": p.max_length, "prompt": p.max_prompt_length, "n": p.train_examples, "micro": micro, "v": 2}
    root = cache / f"teacher-{_key(settings)}"
    if (root / "final" / "config.json").exists():
        print(f"[demo] reusing cached teacher {root / 'final'}")
        return root / "final"
    init = root / "init"
    build_model(p.teacher_size, init, seed=0)
    # two micro-batches of rows sorted by length: the same SFT objective (each weighted by its share of the step's
    # tokens) with less padding computed (Dolly train at length 160: 87.5% of the positions are real tokens instead
    # of 79.5%; 0.80x CPU time per step, bench/README.md "Demo time")
    cfg = load_config("sft", [f"student={init}", *_common(p, root, p.teacher_steps, p.teacher_lr),
                              f"micro_batch_size={micro}", "micro_batch_order=length", "method=teacher-sft"])
    return Path(train(cfg, overwrite=True)["final"])   # an unfinished earlier attempt is started over


def _train_job(recipe: str, overrides: list[str]) -> float:
    """One student run in a worker process (no progress bar there: the parent prints a line per run)."""
    t0 = time.time()
    train(load_config(recipe, [*overrides, "progress=false"]), overwrite=True)
    return time.time() - t0


def distill_all(p: Preset, teacher: Path, out: Path, pool=None) -> tuple[dict[str, Path], dict[str, float]]:
    """Distill every method and ablation from one initial student; with ``pool`` (``runtime.worker_pool``) the
    runs go to its worker processes, costliest first. Returns the final folders and each run's seconds."""
    init = out / "student-init"
    if not (init / "config.json").exists():
        build_model(p.student_size, init, seed=0)
    finals, seconds, todo = {}, {}, {}
    runs = {m: (m, []) for m in p.methods} | {a: ABLATIONS[a] for a in p.ablations}
    for method, (recipe, extra) in runs.items():
        run_dir = out / "methods" / method
        finals[method] = run_dir / "final"
        if (run_dir / "final" / "config.json").exists() and (run_dir / "result.json").exists():
            print(f"[demo] reusing {method} from {run_dir}")
            continue
        todo[method] = (recipe, [f"student={init}", f"teacher={teacher}",
                                 *_common(p, run_dir, p.student_steps, p.student_lr, p.student_batch),
                                 f"sampling.max_new_tokens={p.max_new_tokens}", *DEMO_OVERRIDES.get(recipe, []),
                                 *extra, f"method={method}"])
    if pool is None:
        for method, (recipe, overrides) in todo.items():
            t0 = time.time()
            train(load_config(recipe, overrides), overwrite=True)
            seconds[method] = time.time() - t0
        return finals, seconds
    order = sorted(todo, key=lambda m: -RUN_COST.get(m, 0))
    jobs = {pool.submit(_train_job, *todo[m]): m for m in order}
    for future in as_completed(jobs):
        seconds[jobs[future]] = future.result()
        print(f"[demo] {jobs[future]} trained in {seconds[jobs[future]]:.0f} s", file=sys.stderr, flush=True)
    return finals, seconds


def default_workers() -> int:
    """Worker processes for the student runs and the evaluation: one per CPU, at most 8."""
    return min(available_cpus(), 8)


def _compare(a: dict, b: dict) -> tuple[float, float]:
    """Difference of means a - b and twice its standard error over seeds (Welch)."""
    def n(e):
        return max(1, sum(v is not None for v in e["seeds"].values()))

    diff = a["mean"] - b["mean"]
    se = math.sqrt((a["std"] or 0) ** 2 / n(a) + (b["std"] or 0) ** 2 / n(b))
    return diff, 2 * se


def verdicts(results: dict, baseline: str = "sft") -> list[str]:
    """Which methods beat ``baseline`` on the average: difference of means larger than twice its standard error
    over seeds (Welch); otherwise 'no clear difference' or 'worse'."""
    models = results["models"]
    base = models[baseline][AVERAGE]
    lines = []
    for name, entry in models.items():
        if name in (baseline, "teacher") or name in ABLATIONS:
            continue
        diff, two_se = _compare(entry[AVERAGE], base)
        if diff > two_se and diff > 0:
            verdict = f"**beats SFT** by {diff:+.2f} ROUGE-L (2 x standard error = {two_se:.2f})"
        elif diff < -two_se:
            verdict = f"is **worse than SFT** by {diff:+.2f} (2 x standard error = {two_se:.2f})"
        else:
            verdict = f"does **not** beat SFT at this scale ({diff:+.2f}, within 2 x standard error = {two_se:.2f})"
        lines.append(f"- `{name}` {verdict}")
    return lines


def teacher_vs_sft(results: dict) -> list[str]:
    """Per benchmark and on average: is the teacher ahead of the SFT student by more than 2 standard errors?"""
    t, s = results["models"]["teacher"], results["models"]["sft"]
    parts = []
    for bench in [*results["benchmarks"], AVERAGE]:
        a = t[AVERAGE] if bench == AVERAGE else t["benchmarks"][bench]
        b = s[AVERAGE] if bench == AVERAGE else s["benchmarks"][bench]
        if a["mean"] is None or b["mean"] is None:
            continue
        diff, two_se = _compare(a, b)
        word = "ahead" if diff > two_se else "behind" if diff < -two_se else "level"
        parts.append(f"{'average' if bench == AVERAGE else bench} {diff:+.2f} ({word})")
    return ["- Teacher minus SFT student, per benchmark (ahead/behind = beyond 2 standard errors): "
            + ", ".join(parts) + "."]


def ablation_lines(results: dict, full: str = "mgsr") -> list[str]:
    """What each MGSR part does here: the full method minus each ablation, on the average, with 2 standard errors."""
    models = results["models"]
    if full not in models:
        return []
    lines = []
    for name, (_, overrides) in ABLATIONS.items():
        if name not in models:
            continue
        diff, two_se = _compare(models[full][AVERAGE], models[name][AVERAGE])
        part = PART_NAMES.get(name.removeprefix(f"{full}-no-"), name)
        word = ("helps" if diff > two_se else "hurts" if diff < -two_se else "makes no clear difference")
        lines.append(f"- {part} ({' '.join(overrides)} removes it): "
                     f"`{full}` minus `{name}` = {diff:+.2f} ROUGE-L (2 x standard error = {two_se:.2f}): the part "
                     f"**{word}** at this scale.")
    return lines


def claim_output(out: Path, preset: str, settings: dict) -> None:
    """Record in ``out/demo-preset.json`` which preset's demo this folder holds; refuse one of other settings."""
    marker = out / "demo-preset.json"
    if marker.exists():
        old = json.loads(marker.read_text(encoding="utf-8"))
        if old.get("settings") != settings:
            keys = sorted(k for k in {*old.get("settings", {}), *settings}
                          if old.get("settings", {}).get(k) != settings.get(k))
            raise ConfigError(f"--out {out} holds the demo of preset {old.get('preset')!r} (settings that differ: "
                              f"{', '.join(keys)}); give another --out")
        return
    write_json(marker, {"preset": preset, "settings": settings})


def run_demo(preset: str | Preset = "full", out: str | Path = "runs/demo/full", name: str | None = None,
             workers: int | None = None, cache: str | Path | None = None) -> Path:
    """Run the demo; ``workers`` (default ``default_workers()``) processes run the student trainings and the
    evaluation's (model, benchmark) jobs side by side, each on this machine's CPUs shared out (one thread each on 2
    cores); ``workers=1`` runs everything here, in order, on this process's threads. The teacher trains here either
    way (one run). Each run and each prediction is computed as in one process (same seeds, same data order), so
    the workers change the wall time, not the numbers (tests/test_demo.py checks it). Writes ``out/report.md``;
    the teacher is cached in ``cache`` (default ``out/cache``)."""
    if isinstance(preset, Preset):
        p, preset = preset, name or "custom"
    elif preset in PRESETS:
        p = PRESETS[preset]
    else:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out = Path(out)
    claim_output(out, preset, json.loads(json.dumps(asdict(p))))   # tuples as lists, as read back from JSON
    workers = default_workers() if workers is None else max(1, int(workers))
    t0 = time.time()
    times = {}
    teacher = build_teacher(p, Path(cache) if cache is not None else out / "cache")
    times["teacher"] = time.time() - t0
    threads = max(1, available_cpus() // workers)
    pool = worker_pool(workers, threads) if workers > 1 else None
    try:
        finals, run_seconds = distill_all(p, teacher, out, pool)
        times["students"] = time.time() - t0 - times["teacher"]
        models = [f"teacher={teacher}"] + [f"{m}={path}" for m, path in finals.items()]
        t1 = time.time()
        results = evaluate_models(models, p.benchmarks, p.seeds, out / "eval", batch_size=32, limit=p.eval_limit,
                                  max_new_tokens=p.eval_max_new_tokens, device="cpu", executor=pool)
        times["eval"] = time.time() - t1
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    curves = plot_curves(None, out / "training_curves.png",
                         runs={m: out / "methods" / m / "metrics.jsonl" for m in finals})
    table = markdown_table(results)

    teacher_avg = results["models"]["teacher"][AVERAGE]
    sft_avg = results["models"]["sft"][AVERAGE] if "sft" in results["models"] else None
    total = time.time() - t0
    lines = [f"# lmdistill demo ({preset})", "",
             f"Teacher `{p.teacher_size}` trained with SFT for {p.teacher_steps} steps on Dolly train; student "
             f"`{p.student_size}` distilled from one initialisation with the same data order for {p.student_steps} "
             f"steps per method (batch {p.student_batch}).",
             f"Evaluation: paper protocol (Alpaca template, sampling T=1, top-p 1, top-k 0, ROUGE-L with stemmer), "
             f"first {p.eval_limit} examples per benchmark, at most {p.eval_max_new_tokens} new tokens, seeds "
             f"{', '.join(map(str, p.seeds))}; cells are mean ± std over seeds.", "", table, "",
             "## What the numbers say", ""]
    if sft_avg:
        gap = teacher_avg["mean"] - sft_avg["mean"]
        lines.append(f"- The teacher scores {teacher_avg['mean']:.2f} on average against the SFT student's "
                     f"{sft_avg['mean']:.2f} ({gap:+.2f}).")
        lines += teacher_vs_sft(results)
        lines += verdicts(results)
    ablations = ablation_lines(results)
    if ablations:
        lines += ["", "## What each MGSR part does (ablations)", ""] + ablations
    overrides = [f"`{r}`: {' '.join(o)}" for r, o in DEMO_OVERRIDES.items() if r in p.methods]
    if overrides:
        lines += ["", "Demo departures from the recipes (CPU budget): " + "; ".join(overrides)
                  + " (the reference starts the replay threshold at 0 and raises it as the validation loss rises "
                  "over ~20 epochs; in these few steps it would never rise)."]
    lines += ["", "## Pictures", "", f"![training curves]({curves.name})", "",
              "![benchmark](eval/results.png)", "",
              "## Time", "", f"teacher {times['teacher']:.0f} s, students {times['students']:.0f} s, "
              f"evaluation {times['eval']:.0f} s, total {total:.0f} s (wall clock; "
              + (f"student runs and evaluation in {workers} worker processes of {threads} thread(s) each, the "
                 f"teacher in this process; the student runs' own times add up to {sum(run_seconds.values()):.0f} s)."
                 if pool else "one process).")]
    if preset == "full":
        lines += ["", "The `full` preset is sized to finish within 20 minutes on 2 CPU cores: its teacher trains 400 "
                  "steps and its students 100 steps of 8 sequences (before issue 19: 1000 steps, and 120 of 16, "
                  "33.9 min). The methods, benchmarks and protocol are the same; bench/README.md (\"Demo time\") "
                  "compares the verdicts of both sizes."]
    report = out / "report.md"
    write_text(report, "\n".join(lines) + "\n")
    write_json(out / "demo.json", {"preset": asdict(p), "times_s": times, "total_s": total, "workers": workers,
                                   "threads_per_worker": threads if pool else None,
                                   "run_s": run_seconds,
                                   "teacher": str(teacher), "students": {k: str(v) for k, v in finals.items()}})
    print("\n" + table + "\n")
    print("\n".join(lines[lines.index("## What the numbers say") + 2:lines.index("## Pictures")]))
    print(f"\n[demo] report: {report}\n[demo] curves: {curves}\n[demo] chart:  {out / 'eval' / 'results.png'}")
    print(f"[demo] total time {total / 60:.1f} min")
    return report
