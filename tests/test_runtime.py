"""Process settings of the ``lmdistill`` executable: subnormal floats flushed to zero on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import lmdistill.cli as cli
import lmdistill.cli.data_cmd as data_cmd
import lmdistill.runtime as runtime

# a product of normal floats that is subnormal in float32 (1e-20 * 1e-20 = 1e-40), computed by a parallel kernel
PROBE = ("import torch; from lmdistill.runtime import flush_denormals; on = flush_denormals(); "
         "x = torch.full((1 << 20,), 1e-20) * torch.full((1 << 20,), 1e-20); "
         "print(on, int((x != 0).sum()))")


@pytest.mark.parametrize("env, flushed", [(None, True), ("0", False), ("off", False), ("1", True)])
def test_flush_denormals_in_a_fresh_process(env, flushed):
    environ = {k: v for k, v in os.environ.items() if k != runtime.FLUSH_DENORMAL_ENV}
    if env is not None:
        environ[runtime.FLUSH_DENORMAL_ENV] = env
    out = subprocess.run([sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, check=True)
    on, survivors = out.stdout.split()
    assert on == str(flushed)
    assert int(survivors) == (0 if flushed else 1 << 20)


def test_executable_applies_process_settings_before_the_command(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "flush_denormals", lambda: calls.append("flush") or True)
    monkeypatch.setattr(data_cmd, "cmd_list", lambda args: calls.append("command") or 0)
    monkeypatch.setattr(sys, "argv", ["lmdistill", "data", "list"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    assert exit_info.value.code == 0 and calls == ["flush", "command"]


def test_help_returns_before_the_process_settings(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(runtime, "flush_denormals", lambda: calls.append("flush") or True)
    monkeypatch.setattr(sys, "argv", ["lmdistill", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    assert exit_info.value.code == 0 and calls == [] and "quantify" in capsys.readouterr().out
