"""Checkpoints that restore exactly, verify before they load, and never run code from the folder.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` holding the trainable state (student weights, DAC-KL
module), optimiser, scheduler, every library's RNG state and the trainer state (step, data position, replay
buffer, counters). It is written to a temporary folder and renamed into place, so a crash never leaves a half
checkpoint that resume would pick; only the last ``keep`` are kept, and never at the cost of the newest one that
verifies.

``manifest.json``, written last and atomically, records every file's size and SHA-256. ``--resume`` takes the
newest checkpoint whose files match their manifest (naming each one it skips and why); ``--resume PATH`` to a
damaged one is a ``ConfigError`` naming the damaged file. Everything restores with ``torch.load(weights_only=True)``
(tensors, numbers, strings and plain containers; the numpy RNG state is stored as a tensor) or JSON, so a
checkpoint folder from elsewhere cannot execute code. A write that fails (full disk, read-only or forbidden
folder) is a ``StorageError`` naming the folder, the reason and the last good checkpoint; earlier checkpoints are
left as they were.

A module or optimiser with ``per_rank = True`` (``fsdp.ShardedState`` / ``fsdp.ShardedOptimizer``: FSDP2 with
``checkpoint_format=sharded``) is written by every rank as ``NAME-rankR.pt`` (its own shards, no gathering) instead
of by rank 0 as ``NAME.pt``; the manifest records the number of processes, and resuming such a checkpoint under
another number is a ``ConfigError`` that says so (the same on every rank, so no rank resumes alone).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lmdistill.errors import ConfigError, StorageError

PREFIX = "step-"
MANIFEST = "manifest.json"
FORMAT = "lmdistill-checkpoint/1"
#: Files every checkpoint has besides the modules' ``NAME.pt`` and the ranks' ``rng-rankR.pt``.
SHARED = ("scheduler.pt", "trainer_state.json")
REQUIRED = ("optimizer.pt", *SHARED)


# ---------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Every library's RNG state as tensors, numbers and tuples (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- finding
def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Every complete checkpoint folder under ``root`` (verified or not), oldest first."""
    root = Path(root)
    if not root.exists():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
            and p.name[len(PREFIX):].isdigit() and ((p / MANIFEST).exists() or (p / "DONE").exists())]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (the last good one), or None."""
    for path in reversed(checkpoint_dirs(root)):
        if verify_checkpoint(path) is None:
            return path
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(path: Path) -> tuple[dict | None, str | None]:
    file = path / MANIFEST
    if not file.exists():
        return None, (f"no {MANIFEST} (written before lmdistill verified checkpoints, or never finished); "
                      "it cannot be verified")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"{MANIFEST} is damaged ({e})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None, f"{MANIFEST} is not a {FORMAT} manifest"
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and k == Path(k).name and k not in ("", ".", "..") and isinstance(v, dict)
            and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str) for k, v in files.items()):
        return None, f"{MANIFEST} is damaged (its file list is malformed)"
    return manifest, None


def verify_checkpoint(path: str | Path, need: tuple[str, ...] = REQUIRED) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted (e.g. ``student.pt size 1234 != manifest 5678``), or None
    when every file its manifest lists (and every file of ``need``) is there with the recorded size and SHA-256."""
    path = Path(path)
    manifest, problem = _read_manifest(path)
    if problem:
        return problem
    files = manifest["files"]
    for name in need:
        if name not in files:
            return f"{name} is not in {MANIFEST}"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"{name} size {size} != manifest {entry['size']}"
        try:
            digest = _sha256(file)
        except OSError as e:
            return f"{name} cannot be read ({e.strerror or e})"
        if digest != entry["sha256"]:
            return f"{name} SHA-256 {digest[:12]}... != manifest {entry['sha256'][:12]}... (the file is damaged)"
    return None


# ---------------------------------------------------------------------------------------------- saving
def _write(path: Path, write: Callable) -> None:
    """Create ``path``, let ``write(f)`` fill it, flush and fsync it."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _save_tensor_file(obj, path: Path) -> None:
    _write(path, lambda f: torch.save(obj, f))   # through a Python file: a full disk is an OSError, not torch's


def _save_json(obj, path: Path) -> None:
    data = json.dumps(obj).encode("utf-8")
    _write(path, lambda f: f.write(data))


def save_checkpoint(root: str | Path, step: int, modules: dict[str, torch.nn.Module | None], optimizer, scheduler,
                    trainer_state: dict, keep: int, rank: int = 0, world: int = 1) -> Path:
    """Write ``root/step-N`` atomically. Every rank saves its RNG state; rank 0 saves the rest and the manifest.

    A failed write (``OSError``: full disk, no permission, read-only) removes the partial folder and raises
    ``StorageError`` naming the last good checkpoint, which is left intact."""
    root = Path(root)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}"
    aside = root / f".old-{PREFIX}{step:07d}"
    placed = False
    try:
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier(world)
        _save_tensor_file(rng_state(), tmp / f"rng-rank{rank}.pt")
        for name, module in modules.items():
            if module is not None and (rank == 0 or _per_rank(module)):
                _save_tensor_file({k: v.detach().cpu() for k, v in module.state_dict().items()},
                                  tmp / _file(name, module, rank))
        if rank == 0 or _per_rank(optimizer):
            _save_tensor_file(optimizer.state_dict(), tmp / _file("optimizer", optimizer, rank))
        if rank == 0:
            _save_tensor_file(scheduler.state_dict(), tmp / "scheduler.pt")
            _save_json(trainer_state, tmp / "trainer_state.json")
        _barrier(world)
        if rank == 0:
            _write(tmp / "DONE", lambda f: f.write(str(step).encode()))
            files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                     for p in sorted(tmp.iterdir()) if p.is_file()}
            _save_json({"format": FORMAT, "step": step, "world": world, "files": files}, tmp / f".{MANIFEST}.tmp")
            os.replace(tmp / f".{MANIFEST}.tmp", tmp / MANIFEST)   # the manifest last, in one rename
            _fsync_dir(tmp)
            if final.exists():   # the same step saved again (a resumed run): set the old one aside until done
                if aside.exists():
                    shutil.rmtree(aside)
                os.replace(final, aside)
            os.replace(tmp, final)
            placed = True
            _fsync_dir(root)
            shutil.rmtree(aside, ignore_errors=True)
    except Exception as e:
        failed = _os_error(e)   # torch reports a failed write as its own RuntimeError, the OSError in its chain
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            if placed:
                shutil.rmtree(final, ignore_errors=True)
            if aside.exists() and not final.exists():
                try:
                    os.replace(aside, final)
                except OSError:
                    pass
        if failed is None:
            raise
        last = latest_checkpoint(root)   # the step's folder is there only as it was before this save
        good = (f"the last good checkpoint is {last}, resume with --resume" if last is not None
                else "no earlier checkpoint was saved")
        raise StorageError(f"could not write {final} ({failed.strerror or failed}); {good}", path=str(final),
                           errno=failed.errno) from None
    if rank == 0:
        _prune(root, keep)
    _barrier(world)
    return final


def _os_error(exc: BaseException | None) -> OSError | None:
    """The ``OSError`` that is ``exc`` or caused it (its ``__cause__``/``__context__`` chain), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, never the newest one that verifies."""
    dirs = checkpoint_dirs(root)
    old = dirs[:-keep] if keep > 0 else []
    if not old:
        return
    last_good = latest_checkpoint(root)
    for path in old:
        if path != last_good:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- loading
def _per_rank(obj) -> bool:
    return bool(getattr(obj, "per_rank", False))


def _file(name: str, obj, rank: int) -> str:
    return f"{name}-rank{rank}.pt" if _per_rank(obj) else f"{name}.pt"


def _needed(modules: dict, rank: int, optimizer=None) -> tuple[str, ...]:
    return (*(_file(n, m, rank) for n, m in modules.items() if m is not None), _file("optimizer", optimizer, rank),
            *SHARED, f"rng-rank{rank}.pt")


def _check_world(path: Path, modules: dict, optimizer, world: int) -> None:
    """A checkpoint of per-rank shards resumes only as shards, under the number of processes that wrote it; a
    full-state one only as full state. The same decision on every rank (they read the same manifest)."""
    manifest, _ = _read_manifest(path)
    if manifest is None:
        return   # verification reports it
    saved_sharded = "optimizer-rank0.pt" in manifest["files"]
    run_sharded = _per_rank(optimizer) or any(_per_rank(m) for m in modules.values() if m is not None)
    saved = manifest.get("world")
    if saved_sharded and (not run_sharded or saved != world):
        raise ConfigError(f"{path}: holds the shards of {saved} processes (checkpoint_format=sharded) and this run "
                          f"has {world} process{'es' if world > 1 else ''}"
                          f"{'' if run_sharded else ' without sharded checkpoints'}; resume it under FSDP2 with "
                          f"--num_processes {saved} and checkpoint_format=sharded (checkpoint_format=full checkpoints "
                          "resume under any number of processes)")
    if run_sharded and not saved_sharded:
        raise ConfigError(f"{path}: is a full-state checkpoint and this run asks for checkpoint_format=sharded; "
                          "resume it with checkpoint_format=full")


def read_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module | None], rank: int = 0,
                    optimizer=None) -> dict:
    """Every file of the checkpoint the modules and this rank need, loaded without pickle code execution.

    Raises ``ConfigError`` naming the file that does not load."""
    path = Path(path)
    out: dict = {}
    for name in _needed(modules, rank, optimizer):
        file = path / name
        if name == f"rng-rank{rank}.pt" and not file.exists():
            out[name] = None   # a checkpoint from fewer processes: this rank keeps its seeded state
            continue
        try:
            if name.endswith(".json"):
                out[name] = json.loads(file.read_text(encoding="utf-8"))
            else:
                out[name] = torch.load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{path}: {name} does not load ({first[:200]})") from None
    return out


def load_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module | None], optimizer, scheduler,
                    rank: int = 0, verify: bool = True, world: int = 1) -> dict:
    """Restore the checkpoint at ``path`` (verified first); returns the trainer state."""
    path = Path(path)
    _check_world(path, modules, optimizer, world)
    if verify:
        problem = verify_checkpoint(path, _needed(modules, 0, optimizer))
        if problem:
            raise ConfigError(f"--resume {path}: {problem}")
    return _apply(path, read_checkpoint(path, modules, rank, optimizer), modules, optimizer, scheduler, rank)


def _apply(path: Path, loaded: dict, modules: dict, optimizer, scheduler, rank: int) -> dict:
    try:
        for name, module in modules.items():
            if module is not None:
                module.load_state_dict(loaded[_file(name, module, rank)])
        optimizer.load_state_dict(loaded[_file("optimizer", optimizer, rank)])
        scheduler.load_state_dict(loaded["scheduler.pt"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: does not fit this run's model or optimiser ({first[:200]})") from None
    if loaded[f"rng-rank{rank}.pt"] is not None:
        set_rng_state(loaded[f"rng-rank{rank}.pt"])
    return loaded["trainer_state.json"]


def resume_checkpoint(root: str | Path, resume: bool | str | Path, modules: dict[str, torch.nn.Module | None],
                      optimizer, scheduler, rank: int = 0, log: Callable[[str], None] = print,
                      world: int = 1) -> tuple[Path, dict]:
    """``--resume`` (True: the newest checkpoint under ``root`` that verifies and loads, ``log``-ging each one
    skipped and why) or ``--resume PATH`` (that one, or a ``ConfigError`` naming what is wrong with it).
    Returns the checkpoint's path and its trainer state."""
    if resume is not True:
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"--resume {path}: no such checkpoint folder")
        return path, load_checkpoint(path, modules, optimizer, scheduler, rank, world=world)
    root = Path(root)
    skipped = []
    for path in reversed(checkpoint_dirs(root)):
        _check_world(path, modules, optimizer, world)   # every rank reads the same manifest: all stop alike
        problem = verify_checkpoint(path, _needed(modules, 0, optimizer))
        loaded = None
        if problem is None:
            try:
                loaded = read_checkpoint(path, modules, rank, optimizer)
            except ConfigError as e:
                problem = str(e).removeprefix(f"{path}: ")
        if problem is not None:
            skipped.append(f"{path}: {problem}")
            if rank == 0:
                log(f"[lmdistill] skipped {path}: {problem}")
            continue
        return path, _apply(path, loaded, modules, optimizer, scheduler, rank)
    if skipped:
        raise ConfigError(f"--resume: no checkpoint in {root} verifies (skipped {len(skipped)}: "
                          f"{'; '.join(skipped)})")
    raise ConfigError(f"--resume: no checkpoint in {root}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(world: int) -> None:
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
