"""A run folder belongs to one run: the run's identity, an exclusive lock while it lives, and the check that a
new run never mixes with an old one.

**Identity.** Every setting that changes the math (recipe, objective, policy, sampling, optimiser, schedule,
precision, LoRA, lengths, template, seed) plus the models and the data *by content* (sha256 of a model folder's
weight and config files, of a cache's manifest, of the loaded examples) makes the run's identity; its sha256 is
the run's fingerprint. It is written to ``run.json`` when the run starts and into every checkpoint's trainer
state. Settings that only change how long a run goes or what it records (:data:`MAY_CHANGE`) are left out, so
``--resume`` may extend ``max_steps`` or change ``save_steps``. (``eval_steps``/``eval_limit`` are among them;
they also move DistiLLM's replay threshold, which reacts to validation: changing them on resume is allowed and
the run then follows the new schedule from there.)

**The folder check** (rank 0, before any model loads): a folder that holds a run (any of :data:`ARTIFACTS`) is
refused without ``--resume`` or ``--overwrite``; ``--resume`` under another identity is refused naming every key
that differs (``lr: 0.0005 then, 0.001 now``); ``--overwrite`` removes the earlier run's files (and says which).

**The lock**: ``.lock`` in the folder, held with ``flock`` for the run's life. A second process fails at once
naming the holder's PID; the kernel drops the lock of a process that died, so a stale lock is taken over (the run
says whose).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from lmdistill.data import load_examples
from lmdistill.errors import ConfigError
from lmdistill.io import storage_error, write_errno, write_json
from lmdistill.teachers import CACHE, LOCAL, cache_dir, examples_hash, model_fingerprint, teacher_kind
from lmdistill.train.checkpoint import checkpoint_dirs

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
FORMAT = "lmdistill-run/1"

#: Settings that change only how long a run goes or what it records: ``--resume`` may change them.
MAY_CHANGE = ("output_dir", "max_steps", "save_steps", "eval_steps", "log_steps", "keep_checkpoints", "progress",
              "max_bad_steps", "device", "eval_limit", "eval_max_new_tokens", "final_validation")

#: What a run leaves in its folder (``--overwrite`` removes these and nothing else).
ARTIFACTS = (RUN_FILE, "config.json", "metrics.jsonl", "result.json", "curves.png", "fsdp.json",
             "teacher_scores.jsonl", "teachers", "checkpoints", "final", "best", "tb")


# ---------------------------------------------------------------------------------------------- identity
def _data_identity(spec) -> dict:
    if isinstance(spec, dict):   # several sources, {NAME: PATH}
        return {name: _data_identity(path) for name, path in spec.items()}
    if not spec:
        return {"spec": ""}
    examples = load_examples(spec).examples
    out = {"spec": spec, "sha256": examples_hash(examples)}
    if any(ex.teacher for ex in examples):   # the teacher each row names (several teachers) changes the math too
        out["teachers_sha256"] = hashlib.sha256(json.dumps([ex.teacher for ex in examples]).encode()).hexdigest()
    return out


def _model_identity(spec: str) -> dict:
    if not spec:
        return {"spec": ""}
    kind = teacher_kind(spec)
    if kind == LOCAL:
        return {"spec": spec, "sha256": model_fingerprint(spec)}
    if kind == CACHE:
        manifest = Path(cache_dir(spec)) / "manifest.json"
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
        return {"spec": spec, "manifest_sha256": digest}
    if kind == "cross_tokenizer":   # xtok:SOURCE: the source's identity
        return {**_model_identity(spec.strip()[len("xtok:"):]), "spec": spec}
    return {"spec": spec}   # served: the server's name and address are all we know of it


def run_identity(cfg) -> dict:
    """Everything of ``cfg`` that changes the math, with models and data by content."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in MAY_CHANGE}
    values["student"] = _model_identity(cfg.student)
    values["teacher"] = _model_identity(cfg.teacher)
    values["teachers"] = {name: _model_identity(spec) for name, spec in cfg.teachers.items()}
    values["data"] = _data_identity(cfg.data)
    values["valid_data"] = _data_identity(cfg.valid_data)
    return json.loads(json.dumps(values))   # the JSON form: what run.json holds compares equal to a fresh one


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def _flat(value, prefix: str = "") -> dict:
    """Dotted keys: mappings by key, an objective list by its entries' names (``objective.fkl.weight``)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value and all(isinstance(e, dict) and "term" in e for e in value):
        out = {}
        for e in value:
            name = e.get("name", e["term"])
            out.update(_flat({k: v for k, v in e.items() if k != "name"}, f"{prefix}.{name}"))
        return out
    return {prefix: value}


def differences(old: dict, new: dict) -> list[str]:
    """``key: OLD then, NEW now`` for every dotted key whose value differs."""
    a, b = _flat(old), _flat(new)
    missing = object()
    return [f"{k}: {a.get(k, 'unset')!r} then, {b.get(k, 'unset')!r} now"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


# ---------------------------------------------------------------------------------------------- the folder
def _present(out: Path) -> tuple[list[str], bool]:
    """What of a run is in ``out``, and whether any of it is worth keeping (a checkpoint or an exported model)."""
    found, keep = [], False
    for name in ARTIFACTS:
        path = out / name
        if name == "checkpoints":
            steps = checkpoint_dirs(path)
            if steps:
                found.append(f"checkpoints up to {steps[-1].name}")
                keep = True
        elif path.exists():
            found.append(f"{name}/" if path.is_dir() else name)
            keep = keep or name in ("final", "best")
    return found, keep


def _read_run(out: Path) -> dict | None:
    try:
        run = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) and run.get("format") == FORMAT else None


def checkpoint_identity(path: Path) -> dict | None:
    """The run identity a checkpoint was saved under (``None``: saved before lmdistill recorded one)."""
    try:
        state = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    run = state.get("run") if isinstance(state, dict) else None
    return run.get("identity") if isinstance(run, dict) else None


def _refuse_other(identity: dict, saved: dict | None, where: str, log: Callable[[str], None]) -> None:
    if saved is None:
        log(f"[lmdistill] {where} records no run settings (made before lmdistill recorded them); "
            "resuming without checking that they match")
        return
    diff = differences(saved, identity)
    if diff:
        raise ConfigError(f"--resume: {where} was made by a run with other settings ({'; '.join(diff)}); resume "
                          f"with the same settings (only {', '.join(MAY_CHANGE[1:])} may change), or start a new "
                          "run with --overwrite or another output_dir")


def _remove_run(out: Path) -> None:
    for name in ARTIFACTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def claim_folder(out: Path, identity: dict, resume: bool | str, overwrite: bool,
                 log: Callable[[str], None] = print) -> None:
    """Check ``out`` for a run of ``identity`` (refusing to mix two runs); with ``overwrite``, or when what is there
    saved nothing (no checkpoint, no exported model), clear it. :func:`record_run` then writes ``run.json``."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue the run, or replace it")
    present, worth_keeping = _present(out)
    if resume is True:
        if not checkpoint_dirs(out / "checkpoints"):
            raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'}"
                              + (f" (the folder holds {', '.join(present)})" if present else ""))
        run = _read_run(out)
        if run is not None:
            _refuse_other(identity, run.get("identity"), f"{out} (run.json)", log)
        else:
            _refuse_other(identity, checkpoint_identity(checkpoint_dirs(out / "checkpoints")[-1]), str(out), log)
    elif resume:
        _refuse_other(identity, checkpoint_identity(Path(resume)), str(resume), log)
    elif overwrite and present:
        _remove_run(out)
        log(f"[lmdistill] --overwrite: removed the earlier run in {out} ({', '.join(present)})")
    elif worth_keeping:
        run = _read_run(out)
        what = f"a {run['identity'].get('method') or 'training'} run" if run else "a run"
        raise ConfigError(f"output_dir {out}: holds {what} already ({', '.join(present)}); pass --resume to "
                          "continue it, --overwrite to replace it, or choose another output_dir")
    elif present:   # a run that stopped before it saved anything: nothing to lose
        _remove_run(out)
        log(f"[lmdistill] {out} held a run that saved nothing ({', '.join(present)}); starting over")


def record_run(out: Path, identity: dict) -> None:
    """``run.json``: the folder's run, written once its models and data have loaded (kept when resuming)."""
    if _read_run(out) is None or _read_run(out).get("fingerprint") != fingerprint(identity):
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / RUN_FILE, {"format": FORMAT, "fingerprint": fingerprint(identity), "identity": identity})


# ---------------------------------------------------------------------------------------------- the lock
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive ``flock`` on ``DIR/.lock`` holding the owner's PID; released by ``release()`` or by the
    process ending (the kernel drops it, so a dead owner's lock is taken over)."""

    def __init__(self, out: Path, log: Callable[[str], None] = print):
        self.path = Path(out) / LOCK_FILE
        writable = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:   # a read-only folder can still be locked through an existing lock file
            if write_errno(e) is None or not self.path.is_file():
                raise storage_error(self.path, write_errno(e) or e.errno, f"the earlier {out} is unchanged") from None
            fd, writable = os.open(self.path, os.O_RDONLY), False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"output_dir {out}: another lmdistill run is using it (PID {holder}); wait for it to "
                              "end, stop it, or choose another output_dir") from None
        previous = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if previous.isdigit() and int(previous) != os.getpid() and not _alive(int(previous)):
            log(f"[lmdistill] took over the lock of {self.path} from PID {previous}, which is no longer running")
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
