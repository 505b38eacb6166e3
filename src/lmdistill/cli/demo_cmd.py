"""``lmdistill demo [--preset quick|full|smollm2|smollm2-smoke] [--out DIR]``: writes ``DIR/report.md``."""

from __future__ import annotations

from lmdistill.cli import COMMANDS
from lmdistill.demo import PRESETS, run_demo
from lmdistill.demo_real import REAL_PRESETS, run_real_demo
from lmdistill.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("demo", help=COMMANDS["demo"],
                       description="quick/full: a tiny teacher trained here, every method. smollm2: the real "
                                   "SmolLM2-135M-Instruct pruned to a 10-layer student, trained with every method "
                                   "whose recipe exists (SFT, KD, minitron, GKD, DistiLLM, SWITCH, MGSR, opd; gold "
                                   "taught by Gemma-3-270M), evaluation, quantification and the audit tested on "
                                   "ground truth (SFT and Gemma-3-270M as independent models) in one report (60-min "
                                   "budget on 2 CPU cores). Everything goes under --out: DIR/report.md, the runs, the "
                                   "evaluation and the cache.")
    p.add_argument("--preset", default="quick", choices=[*PRESETS, *REAL_PRESETS],
                   help="quick (about 2 min on 2 cores), full (make demo, about 19 min), smollm2 (at most 60 min), "
                        "smollm2-smoke (the smollm2 pipeline at smoke size)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder; the report is DIR/report.md (default: runs/demo/PRESET)")
    p.add_argument("--workers", type=int, default=None,
                   help="quick/full: processes for the student runs and the evaluation (default: one per CPU, at "
                        "most 8; 1 = all in this process)")
    p.add_argument("--no-independent", dest="independent", action="store_false",
                   help="smollm2 presets: leave out the independent model (Gemma-3-270M: its conversion, the gold "
                        "student it teaches, its RSE and ICE); the audit's only independent model is then the SFT "
                        "student")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    out = args.out or f"runs/demo/{args.preset}"
    if args.preset in REAL_PRESETS:
        run_real_demo(args.preset, out, independent=args.independent)
        return 0
    if not args.independent:
        raise ConfigError(f"--no-independent: preset {args.preset} has no independent model (only "
                          f"{', '.join(REAL_PRESETS)} do)")
    run_demo(args.preset, out, workers=args.workers)
    return 0
