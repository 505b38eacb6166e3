"""``lmdistill demo [--preset quick|full] [--out DIR]``."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny teacher, distill students with every method, evaluate, report")
    p.add_argument("--preset", default="quick", choices=["quick", "full"])
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from lmdistill.demo import run_demo

    run_demo(args.preset, args.out)
    return 0
