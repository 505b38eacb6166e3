"""Verified checkpoints: a manifest of sizes and SHA-256, resume skips damaged ones and says why, an explicit bad
one is a one-line error naming the file, nothing restores through pickle code, pruning keeps the last good one."""

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmdistill.cli import main
from lmdistill.errors import ConfigError
from lmdistill.train import checkpoint as ckpt
from lmdistill.train import load_config, train


def tiny(seed=0):
    """A module, its AdamW optimiser (with state) and a transformers scheduler, as the trainer builds them."""
    from transformers import get_scheduler

    torch.manual_seed(seed)
    module = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)
    return module, opt, sched


def train_steps(module, opt, sched, n):
    for _ in range(n):
        module(torch.randn(2, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def save(root, step, module, opt, sched, keep=10):
    return ckpt.save_checkpoint(root, step, {"student": module}, opt, sched, {"step": step, "note": "x"}, keep=keep)


@pytest.fixture
def two(tmp_path):
    """Checkpoints step-2 and step-4 of one tiny run, and the weights each holds."""
    module, opt, sched = tiny()
    held = {}
    for step in (2, 4):
        train_steps(module, opt, sched, 2)
        save(tmp_path, step, module, opt, sched)
        held[step] = {k: v.clone() for k, v in module.state_dict().items()}
    return tmp_path, held


def resume(root, log=None, resume=True):
    module, opt, sched = tiny(seed=99)   # other weights: the restore must replace them
    lines = []
    path, state = ckpt.resume_checkpoint(root, resume, {"student": module}, opt, sched,
                                         log=lines.append if log is None else log)
    return path, state, module, lines


def test_manifest_records_every_file_with_size_and_sha256(two):
    root, _ = two
    path = root / "step-0000004"
    manifest = json.loads((path / "manifest.json").read_text())
    on_disk = sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    assert {"student.pt", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng-rank0.pt"} <= set(on_disk)
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify_checkpoint(path) is None
    assert not [p for p in root.iterdir() if p.name.startswith(".")]   # no temporary folder left


def test_resume_skips_a_truncated_checkpoint_and_says_why(two):
    root, held = two
    student = root / "step-0000004" / "student.pt"
    size = student.stat().st_size
    with open(student, "r+b") as f:
        f.truncate(size // 2)
    path, state, module, lines = resume(root)
    assert path == root / "step-0000002" and state["step"] == 2
    assert lines == [f"[lmdistill] skipped {root / 'step-0000004'}: student.pt size {size // 2} != manifest {size}"]
    assert all(torch.equal(module.state_dict()[k], held[2][k]) for k in held[2])
    assert ckpt.latest_checkpoint(root) == root / "step-0000002"


def test_a_flipped_byte_is_caught_by_the_checksum(two):
    root, _ = two
    optim = root / "step-0000004" / "optimizer.pt"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optim.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"step-0000004: optimizer\.pt SHA-256 .* != manifest .*damaged"):
        resume(root, resume=root / "step-0000004")
    path, _, _, lines = resume(root)
    assert path.name == "step-0000002" and "optimizer.pt SHA-256" in lines[0]


def test_resume_path_to_a_damaged_checkpoint_names_the_file(two, capsys):
    root, _ = two
    (root / "step-0000004" / "scheduler.pt").unlink()
    with pytest.raises(ConfigError, match=r"^--resume .*step-0000004: scheduler\.pt is missing$"):
        resume(root, resume=str(root / "step-0000004"))
    with pytest.raises(ConfigError, match=r"no such checkpoint folder"):
        resume(root, resume=str(root / "step-0000009"))


def test_a_checkpoint_without_manifest_is_unverified(two):
    root, held = two
    (root / "step-0000004" / "manifest.json").unlink()      # as an older lmdistill wrote it (DONE only)
    path, _, module, lines = resume(root)
    assert path.name == "step-0000002"
    assert "step-0000004: no manifest.json" in lines[0] and "cannot be verified" in lines[0]
    with pytest.raises(ConfigError, match=r"step-0000004: no manifest.json .*cannot be verified"):
        resume(root, resume=root / "step-0000004")
    (root / "step-0000002" / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"no checkpoint in .* verifies \(skipped 2: .*step-0000004: no manifest"
                                          r".*step-0000002: manifest.json is damaged"):
        resume(root)


class Payload:
    """Unpickling this runs code (what a checkpoint from elsewhere could do with weights_only=False)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def forge(path, name, obj):
    """Replace ``name`` in the checkpoint with ``obj`` and rewrite the manifest to match (the forger controls
    the whole folder), so only the loader stands between the file and code execution."""
    torch.save(obj, path / name)
    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng-rank0.pt", "student.pt"])
def test_no_file_of_a_checkpoint_can_run_code(two, tmp_path, name):
    root, _ = two
    marker = tmp_path / "marker"
    forge(root / "step-0000004", name, {"state": Payload(marker)})
    assert ckpt.verify_checkpoint(root / "step-0000004") is None        # the forgery passes the checksums
    with pytest.raises(ConfigError, match=rf"step-0000004: {name} does not load \(.*"):
        resume(root, resume=root / "step-0000004")
    path, _, _, lines = resume(root)                                     # --resume falls back past it
    assert path.name == "step-0000002" and f"{name} does not load" in lines[0]
    assert not marker.exists()


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()          # a cached gaussian in numpy's state
    path = tmp_path / "rng.pt"
    torch.save(ckpt.rng_state(), path)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_pruning_keeps_the_last_verified_checkpoint(tmp_path):
    module, opt, sched = tiny()
    for step in (2, 4, 6):
        save(tmp_path, step, module, opt, sched, keep=2)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-0000004", "step-0000006"]   # keep=2 prunes
    (tmp_path / "step-0000006" / "student.pt").write_bytes(b"damaged")
    ckpt._prune(tmp_path, keep=1)
    # keep=1 would leave only the damaged step-6: the newest verified one stays too
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-0000004", "step-0000006"]
    save(tmp_path, 8, module, opt, sched, keep=1)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-0000008"]


def test_saving_a_step_again_replaces_it_whole(two):
    """A run resumed from step-2 past a damaged step-4 writes step-4 anew."""
    root, held = two
    (root / "step-0000004" / "student.pt").write_bytes(b"damaged")
    module, opt, sched = tiny(seed=5)
    save(root, 4, module, opt, sched)
    assert ckpt.verify_checkpoint(root / "step-0000004") is None
    path, _, restored, _ = resume(root)
    assert path.name == "step-0000004"
    assert all(torch.equal(restored.state_dict()[k], module.state_dict()[k]) for k in held[4])
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------- the trainer
def overrides(model_dirs, out, **extra):
    o = {"student": model_dirs["student"], "teacher": model_dirs["teacher"], "output_dir": str(out),
         "max_train_examples": 8, "batch_size": 4, "micro_batch_size": 2, "valid_data": "", "save_steps": 2,
         "eval_steps": 1000, "progress": False, "max_length": 96, "max_prompt_length": 80, "device": "cpu",
         "keep_checkpoints": 3, "max_steps": 4, **extra}
    return [f"{k}={v}" for k, v in o.items()]


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "model.safetensors"))


def test_train_resumes_past_a_damaged_newest_checkpoint_exactly(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config("kd", overrides(model_dirs, out)))
    reference = final_weights(out)
    newest = out / "checkpoints" / "step-0000004"
    size = (newest / "student.pt").stat().st_size
    with open(newest / "student.pt", "r+b") as f:    # the probe: truncate the newest student.pt
        f.truncate(size - 100)
    shutil.rmtree(out / "final")
    capsys.readouterr()
    assert main(["train", "kd", *overrides(model_dirs, out), "--resume", str(newest)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err   # (the rest is the models' loading bars)
    assert err.strip().splitlines()[-1] == f"error: --resume {newest}: student.pt size {size - 100} != manifest {size}"
    assert main(["train", "kd", *overrides(model_dirs, out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"[lmdistill] skipped {newest}: student.pt size {size - 100} != manifest {size}" in printed
    assert f"resumed from {out / 'checkpoints' / 'step-0000002'} at step 2" in printed
    resumed = final_weights(out)
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert ckpt.verify_checkpoint(newest) is None   # step 4 written anew, whole
