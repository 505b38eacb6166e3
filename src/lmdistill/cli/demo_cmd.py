"""``lmdistill demo [--preset quick|full|smollm2|smollm2-smoke] [--out DIR]``."""

from __future__ import annotations

from lmdistill.cli import COMMANDS
from lmdistill.demo import run_demo
from lmdistill.demo_real import REAL_PRESETS, run_real_demo


def register(sub) -> None:
    p = sub.add_parser("demo", help=COMMANDS["demo"],
                       description="quick/full: a tiny teacher trained here, every method. smollm2: the real "
                                   "SmolLM2-135M-Instruct pruned to a 10-layer student, SFT/KD/GKD/MGSR, evaluation "
                                   "and quantification in one report (29.5 min measured on 2 CPU cores; 45-min budget).")
    p.add_argument("--preset", default="quick", choices=["quick", "full", *REAL_PRESETS])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--workers", type=int, default=None,
                   help="quick/full: processes for the student runs and the evaluation (default: one per CPU, at "
                        "most 8; 1 = all in this process)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    if args.preset in REAL_PRESETS:
        run_real_demo(args.preset, args.out)
        return 0
    run_demo(args.preset, args.out, workers=args.workers)
    return 0
