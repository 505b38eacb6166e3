"""Checkpoints that restore exactly.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` holding the trainable state (student weights, DAC-KL
module), optimiser, scheduler, every library's RNG state and the trainer state (step, data position, replay
buffer, counters). It is written to a temporary folder and renamed into place, so a crash never leaves a half
checkpoint that resume would pick; only the last ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

PREFIX = "step-"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "DONE").exists()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: str | Path, step: int, modules: dict[str, torch.nn.Module | None], optimizer, scheduler,
                    trainer_state: dict, keep: int, rank: int = 0, world: int = 1) -> Path:
    """Write ``root/step-N`` atomically. Every rank saves its RNG state; rank 0 saves the rest."""
    root = Path(root)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(world)
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        for name, module in modules.items():
            if module is not None:
                torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, tmp / f"{name}.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
    _barrier(world)
    if rank == 0:
        (tmp / "DONE").write_text(str(step))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(world)
    return final


def load_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module | None], optimizer, scheduler,
                    rank: int = 0) -> dict:
    path = Path(path)
    for name, module in modules.items():
        if module is not None:
            state = torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True)
            module.load_state_dict(state)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir() if path.is_dir() else []:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(world: int) -> None:
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
