"""Markdown tables in the paper's layout and PNG charts for ICE, RSE and white-box results.

``combined_report(dirs, out)`` gathers ``ice.json`` / ``rse.json`` / ``whitebox.json`` from run folders
into one table per test, bar charts, and the ICE-versus-RSE scatter when models have both.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmdistill.errors import ConfigError
from lmdistill.io import write_json, write_jsonl, write_text
from lmdistill.quantify.identity import RULE_JUDGE_LABEL

ASPECTS = ("style", "structure", "content", "overall")
ASPECT_NAMES = {"style": "Response style", "structure": "Logical structure", "content": "Content detail",
                "overall": "Overall"}
RULE_LABEL = RULE_JUDGE_LABEL
JUDGE_FREE_LABEL = "ours (judge-free)"


def ice_judge_label(result: dict) -> str:
    """The judge as reports name it; results written before labels existed get one from their judge name."""
    label = result.get("judge_label")
    if label:
        return label
    return RULE_LABEL if result.get("judge") in (None, "rule") else f"LLM judge {result['judge']}"


def _fmt(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def ice_markdown(results: list[dict]) -> str:
    langs = sorted({lang for r in results for lang in r.get("per_language", {})})
    header = ["Model", "Loose", "Strict", "Hard", "Queries"] + [f"Loose ({l})" for l in langs] + \
             [f"Strict ({l})" for l in langs] + ["Judge", "Mode"]
    rows = []
    for r in results:
        s = r["scores"]
        pl = r.get("per_language", {})
        rows.append([r["target"], _fmt(s["loose"], 3), _fmt(s["strict"], 3), _fmt(s["hard"], 3), str(s["queries"])]
                    + [_fmt(pl.get(l, {}).get("loose"), 3) for l in langs]
                    + [_fmt(pl.get(l, {}).get("strict"), 3) for l in langs]
                    + [ice_judge_label(r), r.get("config", {}).get("mode", "lmdistill")])
    text = "## ICE: identity consistency (share of queries; higher = more signs of distillation)\n\n" + _table(header, rows)
    if len(results) == 1:
        r = results[0]
        c = r["config"]
        text += (f"\nFact: {c['fact']}  \nJudge: {ice_judge_label(r)}; helper: {r['helper']}; {c['mutants']} mutants x "
                 f"{c['questions']} questions; seed {c['seed']}. Errors: {r['scores']['errors']}, unparsable "
                 f"judge replies: {r['scores']['unparsable']}.  \n")
        if "mode" in c:
            system = c.get("system_prompt") or "none"
            text += (f"Mode: {c['mode']} (target system prompt: {system!r}, temperature {c.get('temperature', 0.0)}, "
                     f"up to {c['max_tokens']} tokens; tree: {c.get('tree_rule', '?')}).\n")
            if "helper_length_factor" in c:
                factor = c["helper_length_factor"]
                bound = (f"at most {factor:g}x the rewritten template's estimated tokens" if factor else "no length bound")
                text += (f"Helper: up to {c.get('helper_max_tokens')} tokens per mutation, {bound}; "
                         f"{c.get('mutants_per_round', 1)} mutant(s) per round.\n")
            text += "\n"
        else:
            text += "\n"
        text += _table(["Mutator", "Mutants", "Loose hits"],
                       [[k, str(v["mutants"]), str(v["loose_hits"])] for k, v in r.get("per_mutator", {}).items()])
    text += ("\nHard counts strict hits only when the prompt (mutated template and question) names no model or "
             "company outside the declared fact (no misleading identity information).\n")
    return text


def rse_markdown(results: list[dict]) -> str:
    text = "## RSE: response similarity to the reference (judge scores 1-5; judge-free 0-1)\n\n"
    judged = [r for r in results if r.get("judge_scores")]
    if judged:
        rows = []
        for r in judged:
            for name, scores in r["judge_scores"]["per_set"].items():
                rows.append([r["target"], name] + [_fmt(scores.get(a)) for a in ASPECTS])
            rows.append([r["target"], "**mean of sets**"] + [_fmt(r["judge_scores"]["mean_of_sets"].get(a)) for a in ASPECTS])
        text += "### LLM judge (1-5)\n\n" + _table(["Model", "Prompt set"] + [ASPECT_NAMES[a] for a in ASPECTS], rows)
        for r in judged:
            text += f"\n{r['target']}: reference {r['reference']}, judge {r['judge']}, " \
                    f"unparsable judge replies {r['judge_scores']['unparsable']}"
            errors = r["judge_scores"].get("errors") or []
            text += (f" (each with its error in rse_items.jsonl, e.g. {errors[0]['id']}: {errors[0]['error']})"
                     if errors else "") + ".\n"
    rows = []
    for r in results:
        for name, scores in r["similarity"]["per_set"].items():
            rows.append([r["target"], name] + [_fmt(scores.get(a)) for a in ASPECTS] + [_fmt(scores.get("embedding"))])
        rows.append([r["target"], "**mean of sets**"] + [_fmt(r["similarity"]["mean_of_sets"].get(a)) for a in ASPECTS]
                    + [_fmt(r["similarity"]["mean_of_sets"].get("embedding"))])
    text += f"\n### Similarity, {JUDGE_FREE_LABEL}: not the paper's metric\n\n" + _table(
        ["Model", "Prompt set", "Style", "Structure", "Content (ROUGE-L)", "Overall", "Embedding cosine"], rows)
    text += ("\nStyle: length and formatting features; structure: paragraphs, lists, headings, code blocks, "
             "tables and their order; content: ROUGE-L F1; each in [0, 1], 1 = identical.\n")
    return text


def whitebox_markdown(results: list[dict]) -> str:
    rows = [[r["teacher"], r["student"], str(r["prompts"]), str(r["tokens"]), _fmt(r["kl_mean"], 4),
             _fmt(r["top1_agreement"], 4), r["responses"]] for r in results]
    return ("## White-box distillation degree (teacher-forced; lower KL / higher agreement = closer)\n\n"
            + _table(["Teacher", "Student", "Prompts", "Tokens", "KL(teacher||student)", "Top-1 agreement",
                      "Responses"], rows))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ice_chart(results: list[dict], path: str | Path) -> None:
    plt = _plt()
    names = [r["target"].split("@")[0][-30:] for r in results]
    loose = [r["scores"]["loose"] or 0 for r in results]
    strict = [r["scores"]["strict"] or 0 for r in results]
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(names) + 2), 3.5))
    xs = range(len(names))
    for offset, values, label in ((-0.2, loose, "loose"), (0.2, strict, "strict")):
        bars = ax.bar([x + offset for x in xs], values, width=0.4, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_ylim(0, max([0.1] + loose + strict) * 1.2)
    ax.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("share of queries")
    ax.set_title("ICE: identity contradictions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rse_chart(results: list[dict], path: str | Path) -> None:
    plt = _plt()
    panels = [(f"{JUDGE_FREE_LABEL} 0-1", [r["similarity"]["mean_of_sets"] for r in results])]
    if any(r.get("judge_scores") for r in results):
        panels.append(("LLM judge (1-5)", [(r.get("judge_scores") or {}).get("mean_of_sets", {}) for r in results]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    width = 0.8 / max(1, len(results))
    for ax, (title, values) in zip(axes[0], panels):
        for i, (r, v) in enumerate(zip(results, values)):
            bars = ax.bar([a + i * width for a in range(len(ASPECTS))], [v.get(a) or 0 for a in ASPECTS],
                          width=width, label=r["target"].split("@")[0][-30:])
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.set_ylim(0, 5.5 if title.startswith("LLM") else 1.1)
        ax.set_xticks([a + width * (len(results) - 1) / 2 for a in range(len(ASPECTS))], ASPECTS)
        ax.set_title(f"RSE {title}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scatter_chart(points: list[tuple[str, float, float]], path: str | Path, ylabel: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, x, y in points:
        ax.scatter([x], [y])
        ax.annotate(name.split("@")[0][-25:], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("ICE loose score")
    ax.set_ylabel(ylabel)
    ax.set_title("ICE vs RSE")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read a result ({e})") from None


def combined_report(dirs: list[str | Path], out_dir: str | Path) -> dict:
    """Collect results from run folders into ``report.md``, ``report.json`` and charts in ``out_dir``."""
    found = {"ice": [], "rse": [], "whitebox": []}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise ConfigError(f"{d}: not a folder")
        for kind in found:
            if (d / f"{kind}.json").exists():
                found[kind].append(_load(d / f"{kind}.json"))
    if not any(found.values()):
        raise ConfigError("no ice.json, rse.json or whitebox.json in the given folders")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts, charts = ["# Distillation quantification report\n"], []
    if found["ice"]:
        parts.append(ice_markdown(found["ice"]))
        ice_chart(found["ice"], out / "ice.png")
        charts.append("ice.png")
    if found["rse"]:
        parts.append(rse_markdown(found["rse"]))
        rse_chart(found["rse"], out / "rse.png")
        charts.append("rse.png")
    if found["whitebox"]:
        parts.append(whitebox_markdown(found["whitebox"]))
    points = []
    rse_by_model = {r["target"]: r for r in found["rse"]}
    for ice in found["ice"]:
        rse = rse_by_model.get(ice["target"])
        if rse is None:
            continue
        judged = (rse.get("judge_scores") or {}).get("mean_of_sets", {}).get("overall")
        y = judged if judged is not None else rse["similarity"]["mean_of_sets"]["overall"]
        points.append((ice["target"], ice["scores"]["loose"], y))
    if len(points) >= 2:
        judged = any((r.get("judge_scores") or {}) for r in found["rse"])
        scatter_chart(points, out / "ice_vs_rse.png", "RSE overall (judge, 1-5)" if judged
                      else f"RSE overall, {JUDGE_FREE_LABEL} (0-1)")
        charts.append("ice_vs_rse.png")
    parts.append("\n".join(f"![{c}]({c})" for c in charts) + "\n")
    write_text(out / "report.md", "\n".join(parts))
    summary = {"ice": [{"target": r["target"], "judge": ice_judge_label(r),
                        "mode": r.get("config", {}).get("mode", "lmdistill"), **r["scores"]} for r in found["ice"]],
               "rse": [{"target": r["target"], "similarity": r["similarity"]["mean_of_sets"],
                        "similarity_label": JUDGE_FREE_LABEL,
                        "judge": (r.get("judge_scores") or {}).get("mean_of_sets")} for r in found["rse"]],
               "whitebox": [{k: r[k] for k in ("teacher", "student", "kl_mean", "top1_agreement")}
                            for r in found["whitebox"]],
               "scatter": [{"target": n, "ice_loose": x, "rse_overall": y} for n, x, y in points],
               "charts": charts}
    write_json(out / "report.json", summary)
    return summary


def write_summary(result: dict, out_dir, name: str, rows_key: str, markdown, chart) -> dict:
    """``NAME.json`` (the result without its rows), ``NAME_<rows_key>.jsonl``, ``NAME.md`` and ``NAME.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != rows_key}
    write_json(out / f"{name}.json", summary)
    write_jsonl(out / f"{name}_{rows_key}.jsonl", result[rows_key])
    write_text(out / f"{name}.md", markdown([summary]))
    chart([summary], out / f"{name}.png")
    return summary
