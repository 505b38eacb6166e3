"""``lmdistill demo [--preset quick|full|smollm2|smollm2-smoke] [--out DIR]``."""

from __future__ import annotations


def register(sub) -> None:
    from lmdistill.demo_real import REAL_PRESETS

    p = sub.add_parser("demo", help="distil students with each method, evaluate, quantify, report",
                       description="quick/full: a tiny teacher trained here, every method. smollm2: the real "
                                   "SmolLM2-135M-Instruct pruned to a 10-layer student, SFT/KD/GKD/MGSR, evaluation "
                                   "and quantification in one report (29.5 min measured on 2 CPU cores; 45-min budget).")
    p.add_argument("--preset", default="quick", choices=["quick", "full", *REAL_PRESETS])
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from lmdistill.demo_real import REAL_PRESETS, run_real_demo

    if args.preset in REAL_PRESETS:
        run_real_demo(args.preset, args.out)
        return 0
    from lmdistill.demo import run_demo

    run_demo(args.preset, args.out)
    return 0
