"""The ``lmdistill`` command line.

Each subcommand lives in its own module here and exposes ``register(subparsers)``, which adds its
parser and sets ``func``. Errors the user can fix (``LmdistillError``) print one clear message and
exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from lmdistill import __version__
from lmdistill.errors import LmdistillError

COMMANDS = ("data", "models", "generate", "train", "eval", "score", "demo", "quantify", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmdistill", description="Distill LLMs and measure how distilled a model is.")
    parser.add_argument("--version", action="version", version=f"lmdistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = f"lmdistill.cli.{name}_cmd"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register(sub)
    return parser


def run() -> None:
    """The ``lmdistill`` executable (and ``python -m lmdistill``): process settings, then ``main``."""
    from lmdistill.runtime import flush_denormals

    flush_denormals()
    raise SystemExit(main())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LmdistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
