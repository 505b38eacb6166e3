"""The ``lmdistill`` command line.

Each subcommand lives in its own module here (``lmdistill.cli.NAME_cmd``) and exposes
``register(subparsers)``, which adds its parser and sets ``func``. ``COMMANDS`` holds the one line each
shows in ``lmdistill --help``. Errors the user can fix (``LmdistillError``) print one clear message and
exit with status 2; no traceback.

The one exception to the package's rule of imports at the top of a module: the dispatcher imports a
subcommand's module only when that subcommand is given, because those modules pull in torch and most
of the package, and ``lmdistill --help`` should answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmdistill import __version__, runtime
from lmdistill.errors import LmdistillError
from lmdistill.io import os_storage_error

COMMANDS = {
    "data": "bundled benchmarks and data validation",
    "models": "build tiny models, get real pretrained ones, prune students",
    "generate": "generate responses with a policy (student, teacher, mixed, switch, scrg, teacher_mix)",
    "capture": "run a teacher once over a dataset and store its top-k log-probabilities (teacher=cache:DIR)",
    "train": "distill a teacher into a student with a recipe",
    "eval": "ROUGE-L on Dolly, Self-Instruct, Vicuna, S-NI and UnNI (MiniLLM protocol)",
    "score": "score existing predictions (JSONL id/output) with the protocol's ROUGE-L",
    "demo": "distil students with each method, evaluate, quantify, report",
    "quantify": "measure distillation: ICE, RSE, white-box degree",
    "serve": "serve a local model with an OpenAI-compatible API (/v1/chat/completions, /v1/completions)",
}


def _command_in(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (the top level takes no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: the full parser of the subcommand it names, a one-line entry for every other."""
    parser = argparse.ArgumentParser(prog="lmdistill", description="Distill LLMs and measure how distilled a model is.")
    parser.add_argument("--version", action="version", version=f"lmdistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _command_in(sys.argv[1:] if argv is None else argv)
    for name, line in COMMANDS.items():
        if name == chosen:
            importlib.import_module(f"lmdistill.cli.{name}_cmd").register(sub)
        else:
            sub.add_parser(name, help=line)
    return parser


def run() -> None:
    """The ``lmdistill`` executable (and ``python -m lmdistill``): ``main`` with the process settings applied."""
    raise SystemExit(main(process_settings=True))


def main(argv: list[str] | None = None, *, process_settings: bool = False) -> int:
    """Run the subcommand ``argv`` names. With ``process_settings`` (the executable) the settings of
    ``lmdistill.runtime`` are applied once the arguments parse, so ``--help`` and usage errors never load torch."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if process_settings:
        runtime.flush_denormals()
    try:
        return int(args.func(args) or 0)
    except LmdistillError as e:
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:   # a full disk, read-only or forbidden folder at a write that does not say so itself
        err = os_storage_error(e)
        if err is None:
            raise
        _close_progress_bars()
        print(f"error: {err}", file=sys.stderr)
        return 2


def _close_progress_bars() -> None:
    """End any progress bar the failed command left open, so its error starts a line of its own (tqdm is looked
    up, not imported: a command that drew no bar never loaded it)."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
