"""FSDP2 on CPU (gloo, two processes): the launcher config shipped in configs/accelerate/fsdp2.yaml, the student and
teacher sharded (train/fsdp.py), matching the one-process run, DDP for sampled policies, exact kill -9 resume, and
the teacher's per-process memory halved.

The two-process runs launch ``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` as a user does
(``test_train.py::test_two_processes_match_one`` launches DDP the same way). Sampled on-policy generation draws
from a per-(step, rank, micro-batch) seed, so it is compared with DDP on the same two ranks; greedy generation and
gold-sequence recipes are compared with one process.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FSDP2 = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
DDP = ROOT / "configs" / "accelerate" / "ddp.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):
    ENV.pop(k, None)

#: MGSR without generation (the replay threshold stays 0: every step trains on gold) but with validation and its
#: DAC-KL parameters, which neither DDP nor FSDP synchronise (the trainer all-reduces their gradients).
MGSR_GOLD = {"valid_data": "dolly:valid", "eval_limit": 4, "eval_steps": 5, "eval_max_new_tokens": 8,
             "policy.init_threshold": 0, "policy.threshold_step": 0}
#: GKD on-policy at every step with greedy decoding: the sequences do not depend on which rank draws them.
GKD_GREEDY = {"policy.student_prob": 1.0, "sampling.do_sample": "false"}


def overrides(model_dirs, out, **extra):
    o = {"student": model_dirs["student"], "teacher": model_dirs["teacher"], "output_dir": str(out),
         "max_train_examples": 8, "batch_size": 4, "micro_batch_size": 2, "sampling.max_new_tokens": 12,
         "valid_data": "", "save_steps": 1000, "eval_steps": 1000, "progress": False, "max_length": 96,
         "max_prompt_length": 80, "device": "cpu", "lr": 5e-3, "warmup_steps": 0,
         "template": "alpaca", **extra}   # the rows the tolerances below were set on
    return [f"{k}={v}" for k, v in o.items()]


def one_process(recipe, args):
    return subprocess.Popen([sys.executable, "-m", "lmdistill", "train", recipe, *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def two_processes(recipe, args, config=FSDP2):
    return subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                             "--num_processes", "2", "-m", "lmdistill", "train", recipe, *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p, timeout=300):
    out = p.communicate(timeout=timeout)[0]
    assert p.returncode == 0, out[-4000:]
    return out


def weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "model.safetensors"))


def assert_close_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


def last_checkpoint(out, name):
    ckpts = sorted((Path(out) / "checkpoints").glob("step-*"))
    return torch.load(ckpts[-1] / name, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("recipe,extra", [("gkd", GKD_GREEDY), ("mgsr", MGSR_GOLD)], ids=["gkd", "mgsr"])
def test_fsdp2_matches_one_process(recipe, extra, model_dirs, tmp_path):
    """10 steps under FSDP2 on two processes give the one-process weights (same seed, same global batches)."""
    common = dict(max_steps=10, **extra)
    one, two = tmp_path / "one", tmp_path / "two"
    finish(one_process(recipe, overrides(model_dirs, one, **common)))
    finish(two_processes(recipe, overrides(model_dirs, two, micro_batch_size=1, **common)))
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    a, b = weights(one), weights(two)
    assert any(not torch.equal(a[k], v) for k, v in weights_of(model_dirs["student"]).items())   # it trained
    assert_close_weights(a, b)
    # the checkpoints have the one-process format: full tensors, same keys (DAC-KL's parameters included)
    for name in ("student.pt", "objective.pt"):
        sa, sb = last_checkpoint(one, name), last_checkpoint(two, name)
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-5)
    rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    if recipe == "gkd":
        assert all(r["gen/length"] > 0 for r in rows)   # generated on gathered weights at every step
    else:
        assert [r["step"] for r in rows if "val/rougeL" in r] == [0, 5, 10]   # validation under FSDP2
    # the teacher: each process holds about half of its parameters (the unsharded run holds all of them)
    memory = json.loads((two / "fsdp.json").read_text())
    teacher = memory["teacher"]
    assert len(teacher["local_bytes"]) == 2 and sum(teacher["local_bytes"]) == teacher["full_bytes"]
    for local in teacher["local_bytes"]:
        assert 0.4 < local / teacher["full_bytes"] < 0.6, teacher


def weights_of(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe,extra", [
    ("switch", {"policy.tau0": 0.002}),   # the teacher takes over decoding (random micro models: low JSD)
    ("mgsr", {**MGSR_GOLD, "policy.init_threshold": 1.0, "eval_steps": 1000, "valid_data": "dolly:valid"}),  # SCRG
    ("gkd", {}),                                                               # mixed, sampled
], ids=["switch", "scrg", "gkd-sampled"])
def test_fsdp2_sampled_policies_match_ddp(recipe, extra, model_dirs, tmp_path):
    """Sampled on-policy generation (student, teacher and revisions) under FSDP2 gives DDP's weights on the same two
    ranks: the gathered weights decode exactly what the unsharded ones do."""
    common = dict(max_steps=4, micro_batch_size=1, **extra)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    finish(two_processes(recipe, overrides(model_dirs, ddp, **common), config=DDP))
    finish(two_processes(recipe, overrides(model_dirs, fsdp, **common)))
    assert not (ddp / "fsdp.json").exists() and (fsdp / "fsdp.json").exists()
    assert_close_weights(weights(ddp), weights(fsdp))
    a = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (fsdp / "metrics.jsonl").read_text().splitlines()]
    gen = [k for k in a[-1] if k.startswith(("gen/", "replay/"))]
    assert gen, a[-1]
    for ra, rb in zip(a, b):
        # the same sequences were drawn (lengths, teacher tokens, revisions; JSD up to float summation order)
        assert {k: rb[k] for k in gen if k in rb} == pytest.approx({k: ra[k] for k in gen if k in ra}, rel=1e-5,
                                                                   abs=1e-7)
    if recipe == "switch":
        assert any(r.get("gen/teacher_fraction", 0) > 0 for r in b)   # the sharded teacher decoded too


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_fsdp2_kill9_and_resume_is_exact(fmt, model_dirs, tmp_path):
    """Killed with SIGKILL after its second checkpoint and resumed with --resume, an FSDP2 run ends with the
    uninterrupted run's weights, bit for bit (sampled GKD: the RNG state of every rank restores), with full-state
    checkpoints and with per-rank sharded ones (each rank's file about half the student; resuming those under one
    process is refused by name)."""
    common = dict(max_steps=8, save_steps=2, keep_checkpoints=2, micro_batch_size=1, checkpoint_format=fmt)
    full, part = tmp_path / "full", tmp_path / "part"
    finish(two_processes("gkd", overrides(model_dirs, full, **common)))
    p = two_processes("gkd", overrides(model_dirs, part, **common))
    deadline = time.time() + 300
    while not (part / "checkpoints" / "step-0000004" / "manifest.json").exists():
        assert time.time() < deadline and p.poll() is None, "run ended before the kill"
        time.sleep(0.05)
    _kill_tree(p.pid)
    p.wait()
    assert not (part / "final").exists()
    out = finish(two_processes("gkd", [*overrides(model_dirs, part, **common), "--resume"]))
    assert "resumed from" in out
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    ckpt = sorted((part / "checkpoints").glob("step-*"))[-1]
    if fmt == "full":
        assert (ckpt / "student.pt").exists() and not (ckpt / "student-rank0.pt").exists()
        return
    assert not (ckpt / "student.pt").exists() and not (ckpt / "optimizer.pt").exists()
    sizes = [sum(v.numel() * v.element_size() for v in torch.load(ckpt / f"student-rank{r}.pt",
                                                                    weights_only=True).values()) for r in (0, 1)]
    assert all(0.4 < x / sum(sizes) < 0.6 for x in sizes), sizes   # each rank wrote its half, nothing gathered
    assert all((ckpt / f"optimizer-rank{r}.pt").exists() for r in (0, 1))
    alone = one_process("gkd", [*overrides(model_dirs, part, **common), "--resume"])
    out = alone.communicate(timeout=300)[0]
    assert alone.returncode != 0 and "holds the shards of 2 processes" in out and "Traceback" not in out, out[-2000:]


def _kill_tree(pid: int) -> None:
    """SIGKILL the launcher and every process it started (the two ranks), children first."""
    import psutil

    parent = psutil.Process(pid)
    for child in parent.children(recursive=True):
        child.send_signal(signal.SIGKILL)
    parent.send_signal(signal.SIGKILL)


def test_fsdp_version_1_and_no_process_group_are_refused(monkeypatch):
    from lmdistill.errors import ConfigError
    from lmdistill.train.fsdp import fsdp_requested

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert fsdp_requested() is False
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP version 1 is not supported: lmdistill trains with FSDP2 only"):
        fsdp_requested()
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match="FSDP2 needs torch.distributed"):
        fsdp_requested()


def test_shipped_launcher_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    fsdp = load_config_from_file(str(FSDP2))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.fsdp_config["fsdp_version"] == 2
    assert load_config_from_file(str(DDP)).distributed_type == DistributedType.MULTI_GPU
    zero3 = load_config_from_file(str(ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml"))
    assert zero3.distributed_type == DistributedType.DEEPSPEED and zero3.deepspeed_config["zero_stage"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"chunked_loss": "true"}, {"lora": "true", "lora_r": 4, "lr": 1e-2}],
                         ids=["chunked-loss", "lora"])
def test_fsdp2_chunked_loss_and_lora_match_one_process(extra, model_dirs, tmp_path):
    """The chunked loss (the LM head applied outside the forward, to the gathered root group) and LoRA (frozen base
    weights and trainable adapters sharded in the same groups; the export merges them) under FSDP2."""
    one, two = tmp_path / "one", tmp_path / "two"
    finish(one_process("kd", overrides(model_dirs, one, max_steps=4, **extra)))
    finish(two_processes("kd", overrides(model_dirs, two, max_steps=4, micro_batch_size=1, **extra)))
    a, b = weights(one), weights(two)
    assert not any("lora" in k for k in b)   # merged on export
    assert any(not torch.equal(a[k], v) for k, v in weights_of(model_dirs["student"]).items())
    assert_close_weights(a, b)


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_on_the_cpu(model_dirs, tmp_path):
    """bench/gpu_check.sh in its CPU smoke mode (one process, then FSDP2 on two over gloo): the script's recipe
    keys, launcher line and report still work where no GPU is lent, so it runs as written when one is."""
    env = {**ENV, "GPU_CHECK_CPU": "2", "TEACHER": model_dirs["teacher"], "STUDENT": model_dirs["student"],
           "STEPS": "2", "BATCH": "4", "MICRO": "2", "PY": sys.executable}
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "work")], env=env, cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:]
    lines = [x for x in p.stdout.splitlines() if x.startswith("gpu_check ")]
    assert len(lines) == 2 and "1 GPU" in lines[0] and "FSDP2 on 2 GPUs" in lines[1], lines
    assert all(float(x.split(": ")[1].split()[0]) > 0 for x in lines)   # tokens/s measured
    for sub in ("one_gpu", "fsdp2"):
        assert json.loads((tmp_path / "work" / sub / "result.json").read_text())["steps"] == 2
