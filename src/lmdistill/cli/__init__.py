"""The ``lmdistill`` command line.

Each subcommand lives in its own module here (``lmdistill.cli.NAME_cmd``) and exposes
``register(subparsers)``, which adds its parser and sets ``func``. ``COMMANDS`` holds the one line each
shows in ``lmdistill --help``. Errors the user can fix (``LmdistillError``) print one clear message and
exit with status 2; no traceback.

Every parser is a ``Parser``: its ``--help`` shows each option's default as ``(default: VALUE)`` (options whose
default is None or False, flags and unset values, show none). ``--limit`` is the same everywhere (``add_limit``):
the first N items, 0 = all, a negative number refused by the parser.

The one exception to the package's rule of imports at the top of a module: the dispatcher imports a
subcommand's module only when that subcommand is given, because those modules pull in torch and most
of the package, and ``lmdistill --help`` should answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmdistill import __version__, runtime
from lmdistill.errors import LmdistillError, Stopped
from lmdistill.io import kept_summary, os_storage_error

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


def shown_default(action: argparse.Action) -> str | None:
    """The default ``--help`` shows for ``action``: None when there is nothing to show (no default, False, a flag,
    a positional that must be given, the subcommand list); lists as comma-separated values."""
    default = action.default
    if default is None or default is False or default is argparse.SUPPRESS or action.nargs == 0:
        return None
    if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
        return None
    if isinstance(default, (list, tuple)):
        return ",".join(map(str, default))
    return str(default)


class DefaultsFormatter(argparse.HelpFormatter):
    """``argparse.ArgumentDefaultsHelpFormatter`` without its noise: appends ``(default: VALUE)`` to an option's
    help unless the help already says ``default: VALUE`` itself; shows nothing for None/False defaults and flags."""

    def _get_help_string(self, action):
        help = action.help or ""
        shown = shown_default(action)
        if shown is None or "%(default)" in help or f"default: {shown}" in help:
            return help
        return f"{help} (default: {shown.replace('%', '%%')})".strip()


class Parser(argparse.ArgumentParser):
    """The parser of ``lmdistill`` and of every subcommand (``add_subparsers`` makes its parsers of this class):
    ``DefaultsFormatter`` unless another formatter is asked for."""

    def __init__(self, *args, formatter_class=DefaultsFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        """A usage error in one line (argparse prints the whole usage first, which buries the message)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def limit_value(text: str) -> int:
    """``--limit``'s type: an integer >= 0 (0 = all); anything else is the parser's one-line usage error."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 (0 = all), got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = all), got {n}")
    return n


def add_limit(parser, what: str, default: int = 0, note: str = "") -> None:
    """``--limit N``: only the first N ``what`` (0 = all); the same flag, type and words on every command."""
    parser.add_argument("--limit", type=limit_value, default=default, metavar="N",
                        help=f"only the first N {what}, 0 = all{note}")


def _command_in(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (the top level takes no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: the full parser of the subcommand it names, a one-line entry for every other."""
    parser = Parser(prog="lmdistill", description="Distill LLMs and measure how distilled a model is.")
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
    term = runtime.TerminateAsInterrupt()
    try:
        with term:
            return int(args.func(args) or 0)
    except Stopped as e:   # training: finished its step and saved a checkpoint
        _close_progress_bars()
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except LmdistillError as e:
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # Ctrl-C, or SIGTERM (TerminateAsInterrupt): every append and whole write is durable
        _close_progress_bars()
        signal_name = "SIGTERM" if term.signum else "SIGINT"
        kept = kept_summary()
        print(f"stopped ({signal_name}): " + (f"kept {kept}; rerun the same command to continue from there" if kept
                                              else "nothing had been written yet"), file=sys.stderr)
        return 143 if term.signum else 130
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
