"""Result reports: results.json, results.csv, results.md (papers' layout) and results.png."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lmdistill.io import atomic_open, write_json, write_text

TITLES = {"dolly": "Dolly", "selfinst": "SelfInst", "vicuna": "Vicuna", "sni": "S-NI", "unni": "UnNI (1-2 words)"}
AVERAGE = "average"


def title(bench: str) -> str:
    name, _, split = bench.partition(":")
    return TITLES.get(name, name) + (f" ({split})" if split else "")


def _cell(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    return f"{entry['mean']:.2f} ± {entry['std']:.2f}"


def markdown_table(results: dict) -> str:
    benches = results["benchmarks"]
    head = ["Model", *(title(b) for b in benches), "Avg."]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + [":---:"] * (len(head) - 1)) + "|"]
    for name, m in results["models"].items():
        cells = [_cell(m["benchmarks"].get(b)) for b in benches] + [_cell(m.get(AVERAGE))]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    s = results["settings"]
    ngram = s.get("no_repeat_ngram_size", 0)
    overflow = s.get("prompt_overflow", "drop")  # results written before the setting existed dropped them
    cut = (f"truncated to their first {s['max_prompt_length']} tokens" if overflow == "truncate" else "dropped")
    notes = [
        "",
        f"ROUGE-L (x100, rouge_score with stemmer, max over references), mean ± std (ddof=1) over seeds "
        f"{', '.join(map(str, s['seeds']))}.",
        f"Sampling: {'greedy' if s['greedy'] else 'temperature %g, top-p %g, top-k %d' % (s['temperature'], s['top_p'], s['top_k'])}, "
        + (f"no_repeat_ngram_size {ngram}, " if ngram else "no n-gram ban (no_repeat_ngram_size 0), ")
        + f"at most {s['max_new_tokens']} new tokens, prompts over {s['max_prompt_length']} tokens {cut} "
        f"(prompt_overflow: {overflow})"
        + (f", {s['num_samples']} samples per prompt" if s["num_samples"] > 1 else "")
        + (f", first {s['limit']} examples per benchmark (not the full protocol)" if s["limit"] else "") + ".",
        "",
        "Avg. = mean over " + ", ".join(title(b) for b in results.get("average_over", benches))
        + (f" (not {', '.join(title(b) for b in benches if b not in results['average_over'])}: "
           "UnNI here is the 1-2-word response bucket, not the papers' set; --average-all includes it)"
           if set(benches) - set(results.get("average_over", benches)) else "") + ".",
        "",
        "Examples scored (dropped, truncated by the prompt-length rule):",
        "",
    ]
    for name, m in results["models"].items():
        parts = [f"{title(b)} {e['n']} ({e['dropped']} dropped, {e.get('truncated', 0)} truncated)"
                 for b, e in m["benchmarks"].items()]
        extra = (" (API model: chat-template prompt, no length filter)" if m.get("kind") == "api"
                 else " (chat-template prompt, not the protocol's Alpaca template)" if m.get("prompt") == "chat" else "")
        notes.append(f"- {name}: " + ", ".join(parts) + extra)
    bench_notes = results.get("benchmark_notes", {})
    if any(bench_notes.values()):
        notes += ["", "Benchmark notes:", ""]
        notes += [f"- {title(b)}: {note}" for b, note in bench_notes.items() if note]
    return "\n".join(lines + notes) + "\n"


CSV_FIELDS = ["model", "benchmark", "n", "dropped", "truncated", "mean", "std"]


def csv_text(results: dict) -> str:
    seeds = results["settings"]["seeds"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS + [f"seed{s}" for s in seeds])
    for name, m in results["models"].items():
        for bench, e in list(m["benchmarks"].items()) + [(AVERAGE, m.get(AVERAGE))]:
            if not e:
                continue
            per_seed = [_fmt(e["seeds"].get(str(s))) for s in seeds]
            w.writerow([name, bench, e.get("n", ""), e.get("dropped", ""), e.get("truncated", ""), _fmt(e["mean"]),
                        _fmt(e["std"]), *per_seed])
    return buf.getvalue()


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4f}"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(results["benchmarks"]) + [AVERAGE]
    models = list(results["models"])
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(min(1.6 + 1.3 * len(benches) * max(1, len(models) / 2), 16), 4.6))
    colors = plt.get_cmap("tab10" if len(models) <= 10 else "tab20").colors   # one colour per model
    for i, name in enumerate(models):
        m = results["models"][name]
        entries = [m["benchmarks"].get(b) if b != AVERAGE else m.get(AVERAGE) for b in benches]
        means = [e["mean"] if e and e.get("mean") is not None else 0.0 for e in entries]
        stds = [e["std"] if e and e.get("std") is not None else 0.0 for e in entries]
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(benches))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=name, color=colors[i % len(colors)])
    ax.set_xticks(range(len(benches)), [title(b) if b != AVERAGE else "Avg." for b in benches])
    ax.set_ylabel("ROUGE-L")
    ax.set_title("ROUGE-L, mean ± std over seeds")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def write_reports(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write the four result files atomically; return their paths."""
    out = Path(out_dir)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md",
             "png": out / "results.png"}
    write_json(paths["json"], results)
    write_text(paths["csv"], csv_text(results))
    write_text(paths["md"], markdown_table(results))
    plot(results, paths["png"])
    return paths
