"""The command dispatcher: each subcommand's module loads only when that subcommand runs."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from lmdistill.cli import COMMANDS, build_parser


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_help_table_matches_each_subcommand(name):
    """``lmdistill --help`` shows COMMANDS without importing the subcommands; each must say the same itself."""
    sub = _subcommands(build_parser([name, "--help"]))
    assert {c.dest: c.help for c in sub._choices_actions} == COMMANDS
    chosen = sub.choices[name]
    assert chosen.get_default("func") or _subcommands(chosen)  # the module's own parser, not the one-line entry


def test_top_level_help_loads_no_subcommand_and_no_torch():
    probe = ("import sys, contextlib, io\n"
             "from lmdistill.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
             "    try:\n"
             "        main(['--help'], process_settings=True)\n"
             "    except SystemExit:\n"
             "        pass\n"
             "loaded = sorted(m for m in sys.modules if m.endswith('_cmd') or m.split('.')[0] in ('torch', 'transformers'))\n"
             "print(loaded, 'serve' in out.getvalue())\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] True"
