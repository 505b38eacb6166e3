"""``lmdistill generate``: output lines, resume after kill -9, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmdistill.cli import main


def args_for(model_dirs, out, policy="switch", *extra):
    """``generate`` with ``policy``; SWITCH at threshold 0.001 (its flags belong to ``--policy switch`` only)."""
    return ["generate", "--policy", policy, "--student", model_dirs["student"], "--teacher", model_dirs["teacher"],
            "--data", "dolly", "--out", str(out), "--max-new-tokens", "8", "--batch-size", "3", "--seed", "3",
            *(["--tau0", "0.001"] if policy == "switch" else []), *extra]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_output_lines(model_dirs, tokenizer, tmp_path):
    out = tmp_path / "switch.jsonl"
    assert main(args_for(model_dirs, out, "switch", "--limit", "5")) == 0
    rows = lines(out)
    assert [r["id"] for r in rows] == [f"dolly-test-{i}" for i in range(5)]
    for r in rows:
        assert set(r) == {"id", "prompt", "response", "response_ids", "sources", "stats", "instruction", "input",
                          "output"}
        assert r["output"] == r["response"]      # each line is also a training row (SeqKD on stored samples)
        # template auto: both micro tokenizers have a chat template, so the chat prompt (recorded in the meta file)
        assert r["prompt"].startswith("<|user|>\n") and r["prompt"].endswith("<|end|>\n<|assistant|>\n")
        assert 1 <= len(r["response_ids"]) <= 8 and len(r["sources"]) == len(r["response_ids"])
        assert set(r["sources"]) <= {0, 1}
        assert r["response"] == tokenizer.decode(r["response_ids"], skip_special_tokens=True)
        assert len(r["stats"]["jsd"]) == len(r["response_ids"])
        assert r["stats"]["teacher_fraction"] == pytest.approx(sum(r["sources"]) / len(r["sources"]), abs=1e-6)
    meta = json.loads((tmp_path / "switch.jsonl.meta.json").read_text())
    assert (meta["policy"], meta["template"]) == ("switch", "chat")
    # mixed takes gold responses from the data, scrg records its corrections
    mixed = tmp_path / "mixed.jsonl"
    assert main(args_for(model_dirs, mixed, "mixed", "--limit", "4", "--mix-lambda", "0")) == 0
    for r in lines(mixed):
        assert r["stats"]["origin"] == "gold" and set(r["sources"]) == {1}
    scrg = tmp_path / "scrg.jsonl"
    assert main(args_for(model_dirs, scrg, "scrg", "--limit", "3", "--n-corrections", "2")) == 0
    for r in lines(scrg):
        assert 1 <= len(r["stats"]["correction_positions"]) <= 2
        assert r["sources"].count(2) >= 1


def test_decoder_flag_fast_and_hf_write_the_same_responses(model_dirs, tmp_path, capsys):
    outs = {}
    for decoder in ("fast", "hf"):
        outs[decoder] = tmp_path / f"{decoder}.jsonl"
        assert main(args_for(model_dirs, outs[decoder], "scrg", "--limit", "4", "--decoder", decoder)) == 0
    assert [r["response_ids"] for r in lines(outs["fast"])] == [r["response_ids"] for r in lines(outs["hf"])]
    # resuming a file with another decoder is refused (the settings differ), not mixed
    assert main(args_for(model_dirs, outs["fast"], "scrg", "--limit", "4", "--decoder", "hf")) == 2
    assert "decoder: 'fast' -> 'hf'" in capsys.readouterr().err


def test_no_repeat_ngram_size_flag(model_dirs, tokenizer, tmp_path, capsys):
    """``--no-repeat-ngram-size 2``: no response repeats a bigram of prompt + response (transformers' rule);
    recorded in the meta file, and resuming with another value is refused."""
    out = tmp_path / "ban.jsonl"
    argv = args_for(model_dirs, out, "student", "--limit", "4", "--temperature", "0", "--max-new-tokens", "24",
                    "--no-repeat-ngram-size", "2")
    assert main(argv) == 0
    for r in lines(out):
        ctx = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] + r["response_ids"]
        grams = [tuple(ctx[i:i + 2]) for i in range(len(ctx) - 1)]
        start = len(ctx) - len(r["response_ids"]) - 1  # first bigram that ends in the response
        assert all(g not in grams[:i] for i, g in enumerate(grams) if i >= start)
    assert json.loads((tmp_path / "ban.jsonl.meta.json").read_text())["no_repeat_ngram_size"] == 2
    assert main([a if a != "2" else "3" for a in argv]) == 2
    assert "no_repeat_ngram_size: 2 -> 3" in capsys.readouterr().err


def test_resume_after_torn_write_gives_identical_file(model_dirs, tmp_path):
    full = tmp_path / "full.jsonl"
    assert main(args_for(model_dirs, full, "student", "--limit", "7")) == 0
    data = full.read_bytes()
    cut = tmp_path / "cut.jsonl"
    first = data.split(b"\n")
    cut.write_bytes(b"\n".join(first[:4]) + b"\n" + first[4][: len(first[4]) // 2])  # a torn fifth line
    (tmp_path / "cut.jsonl.meta.json").write_bytes((tmp_path / "full.jsonl.meta.json").read_bytes())
    assert main(args_for(model_dirs, cut, "student", "--limit", "7")) == 0
    assert cut.read_bytes() == data
    assert main(args_for(model_dirs, cut, "student", "--limit", "7")) == 0  # nothing left to do
    assert cut.read_bytes() == data


def test_resume_after_sigkill_gives_identical_file(model_dirs, tmp_path):
    limit = "60"
    ref = tmp_path / "ref.jsonl"
    assert main(args_for(model_dirs, ref, "switch", "--limit", limit)) == 0
    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "lmdistill", *args_for(model_dirs, out, "switch", "--limit", limit)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL, "the run finished before it could be killed"
    finally:
        if proc.poll() is None:
            proc.kill()
    written = out.read_bytes().count(b"\n")
    total = ref.read_bytes().count(b"\n")
    assert 4 <= written < total
    assert main(args_for(model_dirs, out, "switch", "--limit", limit)) == 0
    assert out.read_bytes() == ref.read_bytes()


def test_cli_errors(model_dirs, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    base = ["generate", "--student", model_dirs["student"], "--data", "dolly", "--out", str(out), "--limit", "2"]
    assert main(base + ["--policy", "scrg"]) == 2
    assert "needs --teacher" in capsys.readouterr().err
    assert main(base + ["--policy", "student", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(base + ["--policy", "student", "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": 3}\n')
    assert main(["generate", "--policy", "student", "--student", model_dirs["student"], "--data", str(bad),
                 "--out", str(out)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main(base + ["--policy", "student", "--student", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"id": "x"}\n')
    assert main(["generate", "--policy", "student", "--student", model_dirs["student"], "--data", "dolly",
                 "--out", str(foreign)]) == 2
    assert "not written by" in capsys.readouterr().err
    assert main(base + ["--policy", "student", "--max-new-tokens", "4"]) == 0
    assert main(base + ["--policy", "student", "--max-new-tokens", "5"]) == 2
    assert "max_new_tokens: 4 -> 5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(base + ["--policy", "beam"])
    assert e.value.code == 2
