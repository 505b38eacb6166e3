"""The offline teacher cache: `lmdistill capture` stores what the teacher computes, resumes exactly after a crash or
kill -9, refuses a mismatched cache, and training from it equals training with the live teacher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmdistill.cli import main
from lmdistill.data import collate_for_training, load_examples, tokenize_examples
from lmdistill.errors import ConfigError
from lmdistill.losses.model_forward import selected_logits
from lmdistill.losses.sparse import top_k_teacher
from lmdistill.models import load_model
from lmdistill.teachers import TeacherCache, row_key
from lmdistill.teachers import capture as capture_mod
from lmdistill.train import load_config, train

LEN = ["--max-length", "96", "--max-prompt-length", "80"]


def run_capture(teacher, out, *extra, limit=16, top_k=64):
    return main(["capture", "--teacher", teacher, "--data", "dolly:train", "--out", str(out), "--top-k", str(top_k),
                 "--limit", str(limit), *LEN, "--no-progress", *extra])


def shard_arrays(root: Path) -> dict:
    out = {}
    for p in sorted(root.glob("shard-*.npz")):
        with np.load(p) as z:
            out[p.name] = {k: z[k].copy() for k in z.files}
    return out


def test_cache_holds_the_teachers_top_k_at_every_trained_position(model_dirs, tokenizer, tmp_path):
    assert run_capture(model_dirs["teacher"], tmp_path / "c", "--logprob-dtype", "float32", "--shard-rows", "3",
                       top_k=8) == 0
    cache = TeacherCache(tmp_path / "c")
    assert cache.manifest["template"] == "chat"   # template auto: the micro tokenizer has a chat template
    rows, _ = tokenize_examples(load_examples("dolly:train").examples[:16], tokenizer, template="chat",
                                max_prompt_length=80, max_length=96)
    assert len(cache) == len(rows) == cache.manifest["rows"]
    teacher = load_model(model_dirs["teacher"])
    batch = collate_for_training(rows[:5], tokenizer.pad_token_id)
    with torch.no_grad():
        want = top_k_teacher(selected_logits(teacher, batch, batch["loss_mask"][:, 1:]), 8)
    got = cache.top_k(rows[:5], batch)
    order_w, order_g = want.ids.argsort(-1), got.ids.argsort(-1)
    assert torch.equal(want.ids.gather(1, order_w), got.ids.gather(1, order_g))
    assert torch.allclose(want.logprobs.gather(1, order_w), got.logprobs.gather(1, order_g), atol=1e-6)
    assert torch.allclose(want.rest, got.rest, atol=1e-6)
    assert cache.manifest["bytes_per_token"] == pytest.approx(
        sum(p.stat().st_size for p in (tmp_path / "c").glob("shard-*")) / cache.manifest["tokens"])


def kd(model_dirs, teacher, out, *extra):
    cfg = load_config("kd", [f"student={model_dirs['student']}", f"teacher={teacher}", f"output_dir={out}",
                             "max_train_examples=16", "batch_size=4", "micro_batch_size=2", "valid_data=",
                             "save_steps=1000", "eval_steps=1000", "progress=false", "max_length=96",
                             "max_prompt_length=80", "device=cpu", "max_steps=3", *extra])
    return load_file(os.path.join(train(cfg)["final"], "model.safetensors"))


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("chunked", [False, True])
def test_kd_from_a_full_cache_equals_kd_with_the_live_teacher(model_dirs, tmp_path, chunked):
    assert run_capture(model_dirs["teacher"], tmp_path / "c", "--logprob-dtype", "float32", top_k=10 ** 6) == 0
    extra = ["chunked_loss=true"] if chunked else []
    live = kd(model_dirs, model_dirs["teacher"], tmp_path / "live", *extra)
    cached = kd(model_dirs, f"cache:{tmp_path / 'c'}", tmp_path / "cached", *extra)
    student = load_file(os.path.join(model_dirs["student"], "model.safetensors"))
    assert max_diff(live, student) > 1e-4          # it trained
    assert max_diff(live, cached) < 3e-6   # float32 after Adam steps: the dense and the sparse kernels round apart


def test_a_small_k_cache_trains_and_differs_measurably(model_dirs, tmp_path):
    assert run_capture(model_dirs["teacher"], tmp_path / "c", top_k=16) == 0
    live = kd(model_dirs, model_dirs["teacher"], tmp_path / "live")
    cached = kd(model_dirs, f"cache:{tmp_path / 'c'}", tmp_path / "cached")
    assert 0 < max_diff(live, cached)
    rows = [json.loads(x) for x in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_a_crash_between_shards_resumes_without_loss_or_repeat(model_dirs, tmp_path, monkeypatch):
    assert run_capture(model_dirs["teacher"], tmp_path / "ref", "--shard-rows", "2") == 0
    real = capture_mod.write_shard
    calls = {"n": 0}

    def dies_on_third(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process stops mid-capture
        return real(*args, **kw)

    monkeypatch.setattr(capture_mod, "write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        capture_mod.capture(capture_mod.CaptureSettings(model_dirs["teacher"], "dolly:train", str(tmp_path / "c"),
                                                        limit=16, max_length=96, max_prompt_length=80, shard_rows=2,
                                                        progress=False))
    assert len(list((tmp_path / "c").glob("shard-*.npz"))) == 2
    with pytest.raises(ConfigError, match="did not finish"):
        TeacherCache(tmp_path / "c")
    monkeypatch.setattr(capture_mod, "write_shard", real)
    assert run_capture(model_dirs["teacher"], tmp_path / "c", "--shard-rows", "2") == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["shards_reused"] == 2 and manifest["complete"]
    ref, got = shard_arrays(tmp_path / "ref"), shard_arrays(tmp_path / "c")
    assert ref.keys() == got.keys()
    for name in ref:
        for k in ref[name]:
            assert np.array_equal(ref[name][k], got[name][k]), (name, k)
    keys = [k for s in got.values() for k in s["keys"].tolist()]
    assert len(keys) == len(set(keys)) == manifest["rows"]


def test_kill9_mid_capture_then_rerun_equals_an_uninterrupted_capture(model_dirs, tmp_path):
    args = [sys.executable, "-m", "lmdistill", "capture", "--teacher", model_dirs["teacher"], "--data", "dolly:train",
            "--top-k", "32", "--limit", "200", *LEN, "--shard-rows", "1", "--batch-size", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args + ["--out", str(tmp_path / "ref")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "c")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "c").glob("shard-*.npz"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(list((tmp_path / "c").glob("shard-*.npz")))
    subprocess.run(args + ["--out", str(tmp_path / "c")], check=True, env=env, capture_output=True)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["shards_reused"] >= min(before, manifest["shards"]) - 1
    ref, got = shard_arrays(tmp_path / "ref"), shard_arrays(tmp_path / "c")
    assert ref.keys() == got.keys()
    for name in ref:
        for k in ref[name]:
            assert np.array_equal(ref[name][k], got[name][k]), (name, k)
    assert not list((tmp_path / "c").glob(".*.tmp"))


def test_mismatches_are_refused_with_what_differs(model_dirs, tmp_path, capsys):
    assert run_capture(model_dirs["teacher"], tmp_path / "c", top_k=8) == 0
    assert run_capture(model_dirs["teacher"], tmp_path / "c", top_k=16) == 2
    assert "top_k: cache 8, here 16" in capsys.readouterr().err
    assert run_capture(model_dirs["student"], tmp_path / "c", top_k=8) == 2
    assert "teacher_fingerprint" in capsys.readouterr().err
    base = [f"student={model_dirs['student']}", f"teacher=cache:{tmp_path / 'c'}", f"output_dir={tmp_path / 'o'}",
            "valid_data=", "progress=false", "device=cpu", "max_steps=1", "max_length=96", "max_prompt_length=80"]
    with pytest.raises(ConfigError, match="template: cache 'chat', here 'alpaca'"):
        train(load_config("kd", base + ["template=alpaca"]))
    with pytest.raises(ConfigError, match="is not in cache"):      # the cache holds the first 16 examples only
        train(load_config("kd", base + ["max_train_examples=40", "batch_size=8", "micro_batch_size=8"]))
    with pytest.raises(ConfigError, match="holds only the sequences it was captured on"):
        load_config("gkd", base)
    with pytest.raises(ConfigError, match="policy switch needs its next-token distribution at every generated step; "
                                          "a cache teacher gives"):
        load_config("switch", base)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    assert run_capture(model_dirs["teacher"], tmp_path / "junk") == 2
    assert "not a teacher cache" in capsys.readouterr().err


def test_seqkd_from_stored_teacher_samples(model_dirs, tmp_path):
    """`lmdistill generate --policy teacher` writes training rows; capture them; train KD on them from the cache."""
    samples = tmp_path / "teacher_samples.jsonl"
    assert main(["generate", "--policy", "teacher", "--student", model_dirs["student"], "--teacher",
                 model_dirs["teacher"], "--data", "dolly:train", "--limit", "6", "--out", str(samples),
                 "--max-new-tokens", "10", "--max-prompt-length", "80"]) == 0
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    assert all(r["output"] == r["response"] for r in rows)
    assert main(["capture", "--teacher", model_dirs["teacher"], "--data", str(samples), "--out", str(tmp_path / "c"),
                 "--top-k", "16", *LEN, "--no-progress"]) == 0
    cfg = load_config("kd", [f"student={model_dirs['student']}", f"teacher=cache:{tmp_path / 'c'}",
                             f"data={samples}", f"output_dir={tmp_path / 'o'}", "valid_data=", "progress=false",
                             "device=cpu", "max_steps=2", "batch_size=2", "micro_batch_size=2", "max_length=96",
                             "max_prompt_length=80"])
    result = train(cfg)
    assert Path(result["final"]).exists()
    keys = {row_key(r.input_ids, r.loss_mask) for r in tokenize_examples(
        load_examples(str(samples)).examples, load_model_tok(model_dirs), template="chat", max_prompt_length=80,
        max_length=96)[0]}
    assert keys == set(TeacherCache(tmp_path / "c").index)


def load_model_tok(model_dirs):
    from lmdistill.models import load_tokenizer

    return load_tokenizer(model_dirs["student"])
