"""Fault injection over whole runs (issue 18, item 4).

* ``kill -9`` at points hypothesis chooses (after N finished units: metric lines, output rows, seed files, cached
  answers; then a delay that lands inside the next unit) of ``train``, ``generate``, ``eval`` and ``quantify rse``,
  each a real ``python -m lmdistill`` process, then the rerun (``--resume`` for train): every row exactly once (0
  lost, 0 repeated) and equal to an uninterrupted run's, and trained weights bit-identical (``torch.equal``).
* An ``OSError`` (ENOSPC) at the k-th write of a short ``train`` (two checkpoints, pruning, the exported model,
  the curves) and of a short ``generate``, for every k: the run ends with one ``error: could not write PATH ...``
  line and no traceback, every file it leaves is whole, and the rerun ends as an uninterrupted run does.

The killed runs are subprocesses; the uninterrupted references and the reruns run in this process (torch loaded
once). Both sides keep subnormal floats (``LMDISTILL_FLUSH_DENORMAL=0`` for the subprocesses, the library's
default here) and use one thread, so "bit-identical" compares like with like. ``test_io_faults.py`` covers the
same faults per helper (every write, flush and fsync of a checkpoint save, an atomic file, an append) and on real
full and read-only filesystems; this file drives them through the commands.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from lmdistill.cli import main
from lmdistill.data import resolve
from lmdistill.train import checkpoint as ckpt
from lmdistill.train.ownership import LOCK_FILE

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "LMDISTILL_FLUSH_DENORMAL": "0"}

#: A few examples each (every one is a real process of ~10 s) beside an explicit one in the middle of the run; no
#: shrinking (it would rerun processes). ``--hypothesis-show-statistics`` lists where each kill landed.
KILLS = settings(max_examples=2, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def keep_subnormals():
    torch.set_flush_denormal(False)   # as the subprocesses (another test may have set it)


def run_here(argv: list[str]) -> tuple[int, str]:
    """``lmdistill ARGV`` in this process: its exit status and what it printed (stdout and stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = main(argv)
    return rc, out.getvalue()


def kill_after(argv: list[str], units, n: int, delay: float, log: Path, timeout: float = 300) -> bool:
    """Start ``lmdistill ARGV``, wait until ``units()`` reaches ``n``, wait ``delay`` seconds more, SIGKILL it.
    Returns whether it was killed (False: it finished first, which the caller's rerun must also survive)."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "lmdistill", *argv], env=ENV, stdout=f, stderr=f)
    try:
        deadline = time.time() + timeout
        while proc.poll() is None and units() < n:
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.005)
        if delay:
            time.sleep(delay)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert alive or rc == 0, log.read_text()[-3000:]   # it finished by itself: then it succeeded
    event(f"killed with {units()} units done" if alive else "finished before the kill")   # --hypothesis-show-statistics
    return alive


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def no_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


# ---------------------------------------------------------------------------------------------- train
STEPS = 6


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> str:
    """The first 12 Dolly training rows (reading all 12k of the bundled file would be most of a short run)."""
    path = tmp_path_factory.mktemp("train_data") / "dolly12.jsonl"
    with open(resolve("dolly", "train"), encoding="utf-8") as f:
        path.write_text("".join(next(f) for _ in range(12)), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def dirs(model_dirs, train_data):
    return {**model_dirs, "data": train_data}


def train_argv(dirs, out: Path, **extra) -> list[str]:
    o = {"student": dirs["student"], "teacher": dirs["teacher"], "data": dirs["data"], "output_dir": str(out),
         "max_train_examples": 8,
         "batch_size": 4, "micro_batch_size": 2, "valid_data": "", "save_steps": 2, "eval_steps": 1000,
         "progress": False, "max_length": 96, "max_prompt_length": 80, "device": "cpu", "keep_checkpoints": 2,
         "max_steps": STEPS, **extra}
    return ["train", "kd", *[f"{k}={v}" for k, v in o.items()]]


@pytest.fixture(scope="module")
def train_reference(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_ref") / "run"
    rc, printed = run_here(train_argv(dirs, out))
    assert rc == 0, printed
    return {"weights": weights(out / "final"), "metrics": no_timing(jsonl(out / "metrics.jsonl"))}


def rerun_train(argv: list[str], out: Path) -> str:
    """The rerun after a crash: ``--resume`` when a checkpoint survived, else from the start (``--resume`` with
    none says so and stops)."""
    resume = ckpt.latest_checkpoint(out / "checkpoints") is not None
    rc, printed = run_here(argv + (["--resume"] if resume else []))
    assert rc == 0, printed
    return printed


@pytest.mark.slow
@KILLS
@example(steps=3, delay=0.0)     # between checkpoints: steps 3 is redone from step-2
@given(steps=st.integers(1, STEPS - 1), delay=st.floats(0, 0.3))
def test_train_killed_anywhere_resumes_bit_identically(dirs, train_reference, steps, delay):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        argv = train_argv(dirs, out)
        kill_after(argv, lambda: lines_in(out / "metrics.jsonl"), steps, delay, Path(d) / "killed.log")
        rerun_train(argv, out)
        assert_same_weights(weights(out / "final"), train_reference["weights"])
        # every step's metrics exactly once, each as the uninterrupted run logged it
        assert no_timing(jsonl(out / "metrics.jsonl")) == train_reference["metrics"]
        assert [p.name for p in ckpt.checkpoint_dirs(out / "checkpoints")] == ["step-0000004", "step-0000006"]


# ---------------------------------------------------------------------------------------------- generate
GEN_LIMIT = 12   # of which the prompt filter keeps at least KEPT
KEPT = 8


def generate_argv(dirs, out: Path) -> list[str]:
    return ["generate", "--policy", "switch", "--student", dirs["student"], "--teacher", dirs["teacher"],
            "--data", "dolly", "--limit", str(GEN_LIMIT), "--max-new-tokens", "24", "--batch-size", "1",
            "--seed", "3", "--tau0", "0.001", "--out", str(out)]


@pytest.fixture(scope="module")
def generate_reference(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen_ref") / "gen.jsonl"
    rc, printed = run_here(generate_argv(model_dirs, out))
    assert rc == 0, printed
    assert lines_in(out) >= KEPT
    return out.read_bytes()


@pytest.mark.slow
@KILLS
@example(rows=3, delay=0.0)
@given(rows=st.integers(1, KEPT - 2), delay=st.floats(0, 0.05))
def test_generate_killed_anywhere_reruns_to_the_same_rows(model_dirs, generate_reference, rows, delay):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "gen.jsonl"
        argv = generate_argv(model_dirs, out)
        kill_after(argv, lambda: lines_in(out), rows, delay, Path(d) / "killed.log")
        rc, printed = run_here(argv)
        assert rc == 0, printed
        ids = [r["id"] for r in jsonl(out)]
        assert len(ids) == len(set(ids)) == generate_reference.count(b"\n")   # 0 lost, 0 repeated
        assert out.read_bytes() == generate_reference         # and each row as the uninterrupted run wrote it


# ---------------------------------------------------------------------------------------------- eval
SEEDS = (10, 20, 30, 40)


def eval_argv(dirs, out: Path) -> list[str]:
    return ["eval", f"micro={dirs['student']}", "--benchmarks", "dolly", "--seeds", ",".join(map(str, SEEDS)),
            "--limit", "4", "--max-new-tokens", "24", "--batch-size", "2", "--device", "cpu", "--no-progress",
            "--out", str(out)]


def eval_rows(out: Path) -> dict:
    """Each seed's prediction rows, and its meta without the time it finished."""
    folder = out / "predictions" / "micro" / "dolly"
    seeds = {}
    for s in SEEDS:
        meta = json.loads((folder / f"seed{s}.meta.json").read_text())
        meta.pop("finished_at")
        seeds[s] = (jsonl(folder / f"seed{s}.jsonl"), meta)
    return seeds


@pytest.fixture(scope="module")
def eval_reference(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_ref") / "eval"
    rc, printed = run_here(eval_argv(model_dirs, out))
    assert rc == 0, printed
    return eval_rows(out), json.loads((out / "results.json").read_text())


@pytest.mark.slow
@KILLS
@example(seeds=2, delay=0.0)
@given(seeds=st.integers(0, len(SEEDS) - 1), delay=st.floats(0, 0.1))
def test_eval_killed_anywhere_reruns_to_the_same_predictions(model_dirs, eval_reference, seeds, delay):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "eval"
        argv = eval_argv(model_dirs, out)
        folder = out / "predictions" / "micro" / "dolly"
        kill_after(argv, lambda: len(list(folder.glob("seed*.meta.json"))) if folder.exists() else 0, seeds, delay,
                   Path(d) / "killed.log")
        rc, printed = run_here(argv)
        assert rc == 0, printed
        rows, results = eval_reference
        got = eval_rows(out)
        for s in SEEDS:
            ids = [r["id"] for r in got[s][0]]
            assert len(ids) == len(set(ids)) == 4, s
        assert got == rows
        assert json.loads((out / "results.json").read_text()) == results


# ---------------------------------------------------------------------------------------------- quantify
PROMPTS = 6


def quantify_argv(dirs, prompts: Path, out: Path) -> list[str]:
    return ["quantify", "rse", "--target", dirs["student"], "--reference", dirs["teacher"], "--prompts", str(prompts),
            "--max-tokens", "24", "--device", "cpu", "--no-progress", "--out", str(out)]


def prompt_file(folder: Path) -> Path:
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Explain topic number {i} in a few words."}) + "\n"
                            for i in range(PROMPTS)))
    return path


def cached(out: Path) -> dict:
    rows = jsonl(out / "cache.jsonl")
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "an answer was cached twice"
    return {r["key"]: r for r in rows}


@pytest.fixture(scope="module")
def quantify_reference(model_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("rse_ref")
    out = d / "rse"
    rc, printed = run_here(quantify_argv(model_dirs, prompt_file(d), out))
    assert rc == 0, printed
    return cached(out), jsonl(out / "rse_items.jsonl")


@pytest.mark.slow
@KILLS
@example(answers=PROMPTS, delay=0.0)   # the reference model's answers cached, the target's not yet
@given(answers=st.integers(1, 2 * PROMPTS - 2), delay=st.floats(0, 0.05))
def test_quantify_killed_anywhere_reruns_to_the_same_answers(model_dirs, quantify_reference, answers, delay):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rse"
        argv = quantify_argv(model_dirs, prompt_file(Path(d)), out)
        kill_after(argv, lambda: lines_in(out / "cache.jsonl"), answers, delay, Path(d) / "killed.log")
        rc, printed = run_here(argv)
        assert rc == 0, printed
        cache, items = quantify_reference
        assert cached(out) == cache                       # every request answered once, as without the kill
        assert jsonl(out / "rse_items.jsonl") == items


# ---------------------------------------------------------------------------------------------- k-th write
class RunFaults:
    """Counts the write operations of a whole run and fails the k-th with ``OSError(ENOSPC)`` as the OS raises it
    (with the file name for open, mkdir, mkstemp and rename; without for write, flush and fsync; a failing write
    first writes half its bytes, as a full disk does). Like ``test_io_faults.Faults``, over every module: the
    builtin ``open`` and ``os.fdopen`` in a write mode, ``os.mkdir`` of a new folder, ``tempfile.mkstemp``,
    ``os.replace``, ``os.fsync``. Two differences make "every k" of a run affordable and repeatable: only the main
    thread counts (TensorBoard's writer thread is not the run's, and its timing would move k), and of the many
    ``write`` calls a file gets (``torch.save`` and ``json.dump`` write in small pieces) only the first counts,
    except on unbuffered files (the JSONL appenders), where each write is one row."""

    def __init__(self, monkeypatch):
        self.n, self.fail_at, self.names = 0, None, []
        real_open, real_fdopen = open, os.fdopen
        real_mkdir, real_mkstemp, real_replace, real_fsync = os.mkdir, tempfile.mkstemp, os.replace, os.fsync

        def opener(real, file, mode="r", *a, **k):
            writing = any(c in mode for c in "wax+")
            if writing:
                self.tick("open", file if isinstance(file, (str, os.PathLike)) else None)
            f = real(file, mode, *a, **k)
            return FirstWrite(f, self, (a[0] if a else k.get("buffering", -1)) == 0) if writing else f

        def mkdir(path, *a, **k):
            if not os.path.isdir(path):
                self.tick("mkdir", path)
            return real_mkdir(path, *a, **k)

        def mkstemp(*a, **k):
            self.tick("mkstemp", k.get("dir"))
            return real_mkstemp(*a, **k)

        def replace(src, dst, *a, **k):
            self.tick("replace", src)
            return real_replace(src, dst, *a, **k)

        def fsync(fd):
            self.tick("fsync")
            return real_fsync(fd)

        monkeypatch.setattr("builtins.open", lambda *a, **k: opener(real_open, *a, **k))
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: opener(real_fdopen, *a, **k))
        for name, fn in (("mkdir", mkdir), ("replace", replace), ("fsync", fsync)):
            monkeypatch.setattr(os, name, fn)
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    def tick(self, name, path=None):
        if threading.current_thread() is not threading.main_thread():
            return
        self.n += 1
        self.names.append(name)
        if self.n == self.fail_at:
            if path is None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))

    def arm(self, k):
        self.n, self.fail_at, self.names = 0, k, []

    def count(self):
        self.n, self.fail_at, self.names = 0, None, []


class FirstWrite:
    def __init__(self, f, faults, every):
        self._f, self._faults, self._every, self._written = f, faults, every, False

    def write(self, data):
        if self._every or not self._written:
            self._written = True
            try:
                self._faults.tick("write")
            except OSError:
                self._f.write(data[:len(data) // 2])   # half of it reaches the disk, as when it fills up
                self._f.flush()
                raise
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def every_write_fails_once(monkeypatch, tmp_path, argv_for, check_rerun, shard: int, shards: int) -> list[str]:
    """Count the writes of ``argv_for(out)``, then for each k (of this shard) fail the k-th with ENOSPC: one clear
    line (or a run that shrugged the fault off and finished), then ``check_rerun(out, rc)``. Returns the lines."""
    faults = RunFaults(monkeypatch)
    faults.count()
    rc, printed = run_here(argv_for(tmp_path / "count"))
    total, names = faults.n, list(faults.names)
    assert rc == 0 and total > 10, printed
    said = []
    for k in range(1 + shard, total + 1, shards):
        out = tmp_path / f"k{k}"
        faults.arm(k)
        try:
            rc, printed = run_here(argv_for(out))
        finally:
            faults.count()
        where = f"write {k} of {total} ({names[k - 1]})"
        assert "Traceback" not in printed, (where, printed[-3000:])
        if rc != 0:
            last = printed.strip().splitlines()[-1]
            assert rc == 2 and last.startswith(f"error: could not write {out}"), (where, printed[-3000:])
            assert printed.count("error:") == 1, (where, printed[-3000:])
            assert "(No space left on device)" in last, (where, last)
            said.append(last)
        check_rerun(out, rc, where)
    return said


def assert_whole(out: Path) -> None:
    """What a failed run leaves: every JSONL line whole, no temporary file or folder, every checkpoint verifies."""
    for path in out.rglob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            json.loads(line)
    leftovers = [p for p in out.rglob(".*") if p.name not in (".", LOCK_FILE)]   # the run folder's lock stays
    assert not leftovers, leftovers
    for c in ckpt.checkpoint_dirs(out / "checkpoints"):
        assert ckpt.verify_checkpoint(c) is None, c


@pytest.mark.slow
@pytest.mark.parametrize("shard", [0, 1])
def test_train_fails_cleanly_at_every_write_and_resumes(dirs, tmp_path, monkeypatch, shard):
    """Two steps, a checkpoint after each (the first pruned), the export and the curves."""
    argv_for = lambda out: train_argv(dirs, out, max_steps=2, save_steps=1, keep_checkpoints=1)  # noqa: E731
    rc, printed = run_here(argv_for(tmp_path / "ref"))
    assert rc == 0, printed
    reference = weights(tmp_path / "ref" / "final"), no_timing(jsonl(tmp_path / "ref" / "metrics.jsonl"))

    def check_rerun(out, rc, where):
        if rc != 0:
            assert_whole(out)
            rerun_train(argv_for(out), out)
        assert_same_weights(weights(out / "final"), reference[0])
        assert no_timing(jsonl(out / "metrics.jsonl")) == reference[1], where

    said = every_write_fails_once(monkeypatch, tmp_path, argv_for, check_rerun, shard, 2)
    named = {line.split(" (")[0].split("/k")[-1].partition("/")[2] for line in said}
    assert {"config.json", "metrics.jsonl", "checkpoints/step-0000001", "checkpoints/step-0000002", "final",
            "curves.png", "result.json"} <= named, named


@pytest.mark.slow
def test_generate_fails_cleanly_at_every_write_and_reruns(model_dirs, tmp_path, monkeypatch):
    """The meta file, then one append per row."""
    argv_for = lambda out: ["generate", "--policy", "student", "--student", model_dirs["student"],  # noqa: E731
                            "--data", "dolly", "--limit", "6", "--max-new-tokens", "8", "--batch-size", "2",
                            "--seed", "3", "--out", str(out / "gen.jsonl")]
    rc, printed = run_here(argv_for(tmp_path / "ref"))
    assert rc == 0, printed
    reference = (tmp_path / "ref" / "gen.jsonl").read_bytes()

    def check_rerun(out, rc, where):
        if rc != 0:
            assert_whole(out)
            rc, printed = run_here(argv_for(out))
            assert rc == 0, (where, printed)
        assert (out / "gen.jsonl").read_bytes() == reference, where

    said = every_write_fails_once(monkeypatch, tmp_path, argv_for, check_rerun, 0, 1)
    named = {line.split(" (")[0].rpartition("/")[2] for line in said}
    assert named == {"gen.jsonl.meta.json", "gen.jsonl"}, named
