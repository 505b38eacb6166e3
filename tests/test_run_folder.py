"""A run folder belongs to one run (issue 30, items 1-2 and the trainer's part of 5): no silent mixing of two runs,
an exclusive lock, graceful stops on SIGTERM/SIGINT that resume bit-identically, validation only when asked for,
best/ a link when it is final/."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from lmdistill.cli import main
from lmdistill.errors import ConfigError, LmdistillError
from lmdistill.train import load_config, train
from lmdistill.train.ownership import LOCK_FILE, RUN_FILE, RunLock, differences

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def overrides(model_dirs, out, **extra):
    o = {"student": model_dirs["student"], "teacher": model_dirs["teacher"], "output_dir": str(out),
         "max_train_examples": 8, "batch_size": 4, "micro_batch_size": 2, "sampling.max_new_tokens": 8,
         "valid_data": "", "save_steps": 1000, "eval_steps": 1000, "progress": False, "max_length": 96,
         "max_prompt_length": 80, "device": "cpu", "max_steps": 4, **extra}
    return [f"{k}={v}" for k, v in o.items()]


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------- ownership
def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config("sft", overrides(model_dirs, out, save_steps=2)))
    run = json.loads((out / RUN_FILE).read_text())
    assert run["identity"]["method"] == "sft" and len(run["fingerprint"]) == 64
    # the case: kd into the folder of a finished SFT run
    assert main(["train", "kd", *overrides(model_dirs, out)]) == 2
    err = capsys.readouterr().err
    assert "holds a sft run already" in err and "checkpoints up to step-0000004" in err and "final/" in err
    assert "--resume" in err and "--overwrite" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    # --resume under another recipe, or another learning rate: refused naming what differs, before a model loads
    with pytest.raises(ConfigError, match=r"method: 'sft' then, 'kd' now") as e:
        train(load_config("kd", overrides(model_dirs, out)), resume=True)
    assert "objective.fkl.weight" in str(e.value)
    with pytest.raises(ConfigError, match=r"lr: 0\.0005 then, 0\.001 now"):
        train(load_config("sft", overrides(model_dirs, out, lr=1e-3)), resume=True)
    with pytest.raises(ConfigError, match="contradict"):
        train(load_config("sft", overrides(model_dirs, out)), resume=True, overwrite=True)
    # a checkpoint given by path is checked against its own record
    with pytest.raises(ConfigError, match=r"step-0000002 was made by a run with other settings \(lr"):
        train(load_config("sft", overrides(model_dirs, tmp_path / "other", lr=1e-3)),
              resume=str(out / "checkpoints" / "step-0000002"))


def test_resume_may_extend_the_run_and_equals_one_long_run(model_dirs, tmp_path):
    long = tmp_path / "long"
    train(load_config("kd", overrides(model_dirs, long, max_steps=6, save_steps=2, lr_schedule="constant")))
    short = tmp_path / "short"
    train(load_config("kd", overrides(model_dirs, short, max_steps=4, save_steps=2, lr_schedule="constant")))
    # max_steps and save_steps only change the run's length and bookkeeping
    train(load_config("kd", overrides(model_dirs, short, max_steps=6, save_steps=3, lr_schedule="constant")),
          resume=True)
    assert same_weights(long / "final", short / "final")


def test_overwrite_replaces_the_earlier_run(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config("sft", overrides(model_dirs, out, save_steps=2)))
    (out / "tb").mkdir(exist_ok=True)
    fresh = tmp_path / "fresh"
    train(load_config("kd", overrides(model_dirs, fresh)))
    assert main(["train", "kd", *overrides(model_dirs, out), "--overwrite"]) == 0
    assert "removed the earlier run" in capsys.readouterr().out
    assert same_weights(fresh / "final", out / "final")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004"]   # none of SFT's left
    assert json.loads((out / RUN_FILE).read_text())["identity"]["method"] == "kd"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]


def test_a_run_that_saved_nothing_does_not_block_the_folder(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    # fails at start-up (a cache that is not there): nothing of it may hold the folder
    with pytest.raises(LmdistillError):
        train(load_config("kd", overrides(model_dirs, out, teacher=f"cache:{tmp_path / 'no-cache'}")))
    assert not (out / RUN_FILE).exists()
    # a run killed before its first checkpoint left its log: starting over loses nothing, and says so
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    result = train(load_config("kd", overrides(model_dirs, out)))
    assert "held a run that saved nothing (metrics.jsonl); starting over" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert Path(result["final"]).is_dir()


def test_identity_covers_models_and_data_by_content(model_dirs, tmp_path):
    from lmdistill.train.ownership import run_identity

    a = run_identity(load_config("kd", overrides(model_dirs, tmp_path / "a")))
    b = run_identity(load_config("kd", overrides(model_dirs, tmp_path / "b", max_steps=99, save_steps=7)))
    assert differences(a, b) == []   # output_dir, max_steps, save_steps may change
    c = run_identity(load_config("kd", overrides(model_dirs, tmp_path / "c", data="dolly:valid",
                                                 **{"sampling.temperature": 0.5, "objective.fkl.weight": 0.25})))
    diff = differences(a, c)
    assert any(d.startswith("data.spec:") for d in diff) and any(d.startswith("data.sha256:") for d in diff)
    assert "sampling.temperature: 1.0 then, 0.5 now" in diff
    assert "objective.fkl.weight: 0.5 then, 0.25 now" in diff
    # a student whose weights changed in place is another student
    copy = tmp_path / "student-copy"
    import shutil

    shutil.copytree(model_dirs["student"], copy)
    d = run_identity(load_config("kd", overrides({**model_dirs, "student": str(copy)}, tmp_path / "d")))
    e_before = d["student"]["sha256"]
    w = weights(copy)
    w[next(iter(w))] += 1
    from safetensors.torch import save_file

    save_file(w, str(copy / "model.safetensors"), metadata={"format": "pt"})
    e = run_identity(load_config("kd", overrides({**model_dirs, "student": str(copy)}, tmp_path / "e")))
    assert e["student"]["sha256"] != e_before


# ---------------------------------------------------------------------------------------------- the lock
def test_a_second_process_fails_at_once_naming_the_holder(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from lmdistill.train.ownership import RunLock
        RunLock({str(out)!r})
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", "sft", *overrides(model_dirs, out)]) == 2
        err = capsys.readouterr().err
        assert f"another lmdistill run is using it (PID {holder.pid})" in err
        assert not (out / RUN_FILE).exists()   # refused before touching the folder
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock is gone with it, and the next run takes it over and says so
    result = train(load_config("sft", overrides(model_dirs, out)))
    assert Path(result["final"]).is_dir()
    assert f"took over the lock of {out / LOCK_FILE} from PID {holder.pid}" in capsys.readouterr().out


def test_lock_is_released_when_the_run_fails(model_dirs, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(LmdistillError):   # fails in Run, after the lock was taken: no such student
        train(load_config("sft", overrides(model_dirs, out, student=str(tmp_path / "no-such-model"))))
    RunLock(out).release()   # would raise if the failed run still held it


# ---------------------------------------------------------------------------------------------- graceful stop
STOPPER = """
import os, signal, sys
from lmdistill.train import run
step_at, signame = int(sys.argv[1]), sys.argv[2]
original = run.Run.step
def step(self, s):
    if s == step_at:   # the signal arrives while this optimiser step runs
        os.kill(os.getpid(), getattr(signal, signame))
    return original(self, s)
run.Run.step = step
from lmdistill.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def uninterrupted(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    args = ["distillm", *overrides(model_dirs, out, max_steps=5, save_steps=2, valid_data="dolly:valid", eval_limit=2,
                                   eval_steps=2, eval_max_new_tokens=4,
                                   **{"policy.init_threshold": 0.5, "policy.capacity": 4})]
    assert main(["train", *args]) == 0
    return out, args


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(at=st.integers(0, 4), signame=st.sampled_from(["SIGTERM", "SIGINT"]))
def test_signal_finishes_the_step_saves_and_resumes_bit_exact(uninterrupted, tmp_path_factory, at, signame):
    full, args = uninterrupted
    out = tmp_path_factory.mktemp("stopped")
    args = [a if not a.startswith("output_dir=") else f"output_dir={out}" for a in args]
    p = subprocess.run([sys.executable, "-c", STOPPER, str(at), signame, "train", *args], env=ENV,
                       capture_output=True, text=True, timeout=300)
    code = 143 if signame == "SIGTERM" else 130
    if at == 4:   # the last step: the run ends normally (nothing left to stop)
        assert p.returncode in (0, code), p.stderr[-2000:]
    else:
        assert p.returncode == code, p.stderr[-2000:]
        ckpt = out / "checkpoints" / f"step-{at + 1:07d}"
        assert f"{signame} received" in p.stderr
        assert f"stopped: {signame} after step {at + 1} of 5: checkpoint {ckpt} is verified" in p.stderr
        assert (ckpt / "manifest.json").exists() and not (out / "final").exists()
        assert main(["train", *args, "--resume"]) == 0
    assert same_weights(full / "final", out / "final")
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5]


def test_sigterm_from_outside_stops_cleanly(model_dirs, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "lmdistill", "train", "sft",
                          *overrides(model_dirs, out, max_steps=400, save_steps=1000)],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    import time

    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    step = len(metrics.read_text().splitlines())
    assert f"SIGTERM after step {step} of 400" in err and "--resume" in err
    assert (out / "checkpoints" / f"step-{step:07d}" / "manifest.json").exists()


def test_generate_stopped_by_sigterm_says_what_it_kept(model_dirs, tmp_path):
    out = tmp_path / "gen.jsonl"
    cmd = [sys.executable, "-m", "lmdistill", "generate", "--policy", "student", "--student", model_dirs["student"],
           "--data", "dolly:train", "--limit", "400", "--max-new-tokens", "16", "--batch-size", "2",
           "--out", str(out)]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.time() + 120
    while not (out.exists() and out.read_text().count("\n") >= 2):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    kept = out.read_text().count("\n")
    assert f"stopped (SIGTERM): kept {kept} rows appended to {out}" in err
    assert "rerun the same command to continue" in err


# ---------------------------------------------------------------------------------------------- validation, best/
def test_final_validation_only_when_eval_steps_fired_or_asked(model_dirs, tmp_path):
    common = dict(valid_data="dolly:valid", eval_limit=2, eval_max_new_tokens=4)
    never = train(load_config("sft", overrides(model_dirs, tmp_path / "a", max_steps=3, eval_steps=50, **common)))
    assert never["best"] is None and not (tmp_path / "a" / "best").exists()
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert not any("val/loss" in r for r in rows)
    asked = train(load_config("sft", overrides(model_dirs, tmp_path / "b", max_steps=3, eval_steps=50,
                                               final_validation="always", **common)))
    assert asked["best_step"] == 3
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert "val/loss" in rows[-1]


def test_best_is_a_link_when_it_is_the_final_model(model_dirs, tmp_path):
    out = tmp_path / "run"
    result = train(load_config("sft", overrides(model_dirs, out, max_steps=2, eval_steps=2, valid_data="dolly:valid",
                                                eval_limit=2, eval_max_new_tokens=4)))
    assert result["best_step"] == 2
    best = out / "best"
    assert best.is_symlink() and os.readlink(best) == "final"
    assert same_weights(best, out / "final")
    from lmdistill.models import load_model

    load_model(str(best))   # a model folder like any other
