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
    """This process's rank and the world size of ``torch.distributed``; before the process group starts, what the
    launcher set (``RANK``, ``WORLD_SIZE``: torchrun, ``accelerate launch``); ``(0, 1)`` for a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def denormals_flushed() -> bool:
    """Whether this process's CPU treats subnormal floats as zero (``flush_denormals`` or
    ``torch.set_flush_denormal(True)``): a subnormal float32 multiplied by 1 reads 0 then."""
    import torch

    return bool((torch.tensor([1e-40], dtype=torch.float32) * 1.0)[0] == 0)


def _init_worker(threads: int, flush: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush)


def worker_pool(workers: int, threads: int | None = None):
    """A pool of ``workers`` fresh processes (``spawn``: no state forked from this one) for independent jobs.

    Each worker runs ``threads`` intra-op threads (default: this process's CPUs shared out, at least 1) and the
    subnormal-float mode of this process, so a job computes there what it would compute here with that many
    threads. Why: the demo's models are small (1-5M parameters) and its decoding runs token by token, where a
    second intra-op thread gains little; two jobs side by side on one thread each keep both cores busy.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = threads or max(1, available_cpus() // max(workers, 1))
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads, denormals_flushed()))


class StopSignals:
    """While active, SIGTERM and SIGINT ask the work to stop at its next safe point instead of killing it.

    The first signal sets ``signum`` (the work polls ``requested``) and prints that it was heard; the handlers then
    go back to the defaults, so a second signal stops the process at once. Outside the main thread (where Python
    cannot install handlers) it does nothing. ``exit_code`` is the shell's: 128 + the signal (143 SIGTERM, 130 SIGINT).
    """

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self, what: str = "stopping after the current step"):
        self.what = what
        self.signum: int | None = None
        self._previous: dict = {}

    def _heard(self, signum, _frame) -> None:
        import signal
        import sys

        self.signum = signum
        self._restore()
        print(f"\n[lmdistill] {signal.Signals(signum).name} received: {self.what} (send it again to stop at once)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._heard)
        return self

    def _restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)


class TerminateAsInterrupt:
    """While active (main thread only), SIGTERM raises ``KeyboardInterrupt`` as SIGINT does, so a command stopped by
    a scheduler unwinds like one stopped by Ctrl-C: files close, appended rows stay, and the command line says what
    was kept. ``signum`` records which signal ended the work."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = None

    def _raise(self, signum, _frame):
        self.signum = signum
        raise KeyboardInterrupt

    def __enter__(self) -> "TerminateAsInterrupt":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
