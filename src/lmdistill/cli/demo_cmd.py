"""``lmdistill demo [--preset quick|full|smollm2|smollm2-smoke] [--out DIR]``: writes ``DIR/report.md``."""

from __future__ import annotations

from lmdistill.cli import COMMANDS
from lmdistill.demo import PRESETS, run_demo
from lmdistill.demo_real import REAL_PRESETS, run_real_demo


def register(sub) -> None:
    p = sub.add_parser("demo", help=COMMANDS["demo"],
                       description="quick/full: a tiny teacher trained here, every method. smollm2: the real "
                                   "SmolLM2-135M-Instruct pruned to a 10-layer student, SFT/KD/GKD/MGSR, evaluation "
                                   "and quantification in one report (29.5 min measured on 2 CPU cores; 45-min "
                                   "budget). Everything goes under --out: DIR/report.md, the runs, the evaluation "
                                   "and the cache.")
    p.add_argument("--preset", default="quick", choices=[*PRESETS, *REAL_PRESETS],
                   help="quick (about 2 min on 2 cores), full (make demo, about 19 min), smollm2 (about 30 min), "
                        "smollm2-smoke (the smollm2 pipeline at smoke size)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder; the report is DIR/report.md (default: runs/demo/PRESET)")
    p.add_argument("--workers", type=int, default=None,
                   help="quick/full: processes for the student runs and the evaluation (default: one per CPU, at "
                        "most 8; 1 = all in this process)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    out = args.out or f"runs/demo/{args.preset}"
    if args.preset in REAL_PRESETS:
        run_real_demo(args.preset, out)
        return 0
    run_demo(args.preset, out, workers=args.workers)
    return 0
