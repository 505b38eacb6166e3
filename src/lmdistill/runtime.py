"""Process-wide settings the ``lmdistill`` command applies before it does any work."""

from __future__ import annotations

import os

FLUSH_DENORMAL_ENV = "LMDISTILL_FLUSH_DENORMAL"


def flush_denormals() -> bool:
    """Make the CPU treat subnormal floats as zero (x86 FTZ/DAZ), unless ``LMDISTILL_FLUSH_DENORMAL=0``.

    Why: as a model trains, softmax probabilities in attention and in the losses, Adam's second moments and the
    divergences' ``p * log(p / q)`` terms produce subnormal numbers (below 1.2e-38 in float32), and x86 CPUs
    compute on those many times slower than on normal ones. On the project's 2-core Intel VM an SFT step of the
    demo's tiny-teacher after 1000 steps took 0.89 s with subnormals kept and 0.72 s flushed (``bench/denormal.py``).
    A value that small changes no loss, gradient or sampled token beyond float rounding; GPU kernels are not
    affected. Returns whether flushing is on. The Python API leaves the process alone: call
    ``torch.set_flush_denormal(True)`` there yourself.
    """
    import torch

    if os.environ.get(FLUSH_DENORMAL_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return bool(torch.set_flush_denormal(True))


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size of ``torch.distributed`` (``(0, 1)`` when it is not running)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
