"""I/O faults are one-line errors that keep the earlier state: an OSError injected at the k-th write of a
checkpoint save or of the io helpers, for every k, leaves the last good checkpoint (file, folder, rows) intact and
names the path, the reason and what is left; and on real filesystems (a tmpfs in a user+mount namespace) a full
disk or a read-only one stops `train` and `generate` with one line, after which they resume."""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lmdistill import io as lio
from lmdistill.errors import StorageError
from lmdistill.train import checkpoint as ckpt

CODES = [errno.ENOSPC, errno.EACCES, errno.EROFS]


class Faults:
    """Counts write operations (open for writing, write, flush, fsync, mkdir, rename) and fails the k-th with
    ``OSError(code)``; a failing ``write`` first writes half its bytes, as a full disk does."""

    def __init__(self, monkeypatch, modules):
        self.n, self.fail_at, self.code, self.names = 0, None, errno.ENOSPC, []
        for name in ("fsync", "replace"):
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name), name))
        real_mkdir = os.mkdir

        def mkdir(path, *a, **k):   # only a mkdir that creates a folder writes
            if not os.path.isdir(path):
                self.tick("mkdir")
            return real_mkdir(path, *a, **k)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(tempfile, "mkstemp", self._wrap(tempfile.mkstemp, "mkstemp"))
        monkeypatch.setattr(os, "fdopen", self._opener(os.fdopen))
        for m in modules:   # the modules' own open()
            monkeypatch.setattr(m, "open", self._opener(open), raising=False)

    def tick(self, name=""):
        self.n += 1
        self.names.append(name)
        if self.n == self.fail_at:
            raise OSError(self.code, os.strerror(self.code))

    def _wrap(self, real, name):
        def op(*a, **k):
            self.tick(name)
            return real(*a, **k)
        return op

    def _opener(self, real):
        def opener(file, mode="r", *a, **k):
            writing = any(c in mode for c in "wax+")
            if writing:
                self.tick("open")
            f = real(file, mode, *a, **k)
            return Writer(f, self) if writing else f
        return opener

    def arm(self, k, code=errno.ENOSPC):
        self.n, self.fail_at, self.code, self.names = 0, k, code, []

    def count(self):
        self.n, self.fail_at, self.names = 0, None, []


class Writer:
    def __init__(self, f, faults):
        self._f, self._faults = f, faults

    def write(self, data):
        try:
            self._faults.tick("write")
        except OSError:
            self._f.write(data[:len(data) // 2])
            self._f.flush()
            raise
        return self._f.write(data)

    def flush(self):
        self._faults.tick("flush")
        return self._f.flush()

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def hidden(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------- checkpoints
def tiny():
    from transformers import get_scheduler

    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)
    module(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    return module, opt, sched


def save(root, step, module, opt, sched):
    return ckpt.save_checkpoint(root, step, {"student": module}, opt, sched, {"step": step}, keep=3)


def restored(root):
    module = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    from transformers import get_scheduler

    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)
    path, state = ckpt.resume_checkpoint(root, True, {"student": module}, opt, sched, log=lambda _: None)
    return path, state, module


@pytest.mark.parametrize("again", [False, True], ids=["new-step", "same-step-again"])
def test_checkpoint_save_fails_cleanly_at_every_write(tmp_path, monkeypatch, again):
    """The k-th write of saving step-4 fails, for every k: one clear StorageError, and the earlier checkpoints
    (step-2, and step-4 itself when that step is saved again) are intact and resume exactly."""
    module, opt, sched = tiny()
    template = tmp_path / "template"
    save(template, 2, module, opt, sched)
    if again:
        save(template, 4, module, opt, sched)
    before = {p.name: {f.name: f.read_bytes() for f in p.iterdir()} for p in ckpt.checkpoint_dirs(template)}
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    module.weight.data += 1   # what the failing save would have stored
    faults = Faults(monkeypatch, [ckpt])
    scratch = tmp_path / "count"
    shutil.copytree(template, scratch)
    faults.count()
    save(scratch, 4, module, opt, sched)
    total = faults.n
    assert total > 10
    last_good = "step-0000004" if again else "step-0000002"
    for k in range(1, total + 1):
        root = tmp_path / f"k{k}"
        shutil.copytree(template, root)
        code = CODES[k % 3]
        faults.arm(k, code)
        with pytest.raises(StorageError) as e:
            save(root, 4, module, opt, sched)
        faults.count()
        assert str(e.value) == (f"could not write {root / 'step-0000004'} ({os.strerror(code)}); the last good "
                                f"checkpoint is {root / last_good}, resume with --resume"), k
        after = {p.name: {f.name: f.read_bytes() for f in p.iterdir()} for p in ckpt.checkpoint_dirs(root)}
        assert after == before, k          # byte for byte, nothing half-written beside them
        assert hidden(root) == [], k
        path, state, got = restored(root)
        assert path == root / last_good and state["step"] == int(last_good[-1])
        assert all(torch.equal(got.state_dict()[n], weights[n]) for n in weights), k


def test_a_failed_first_save_says_there_is_no_checkpoint_yet(tmp_path, monkeypatch):
    module, opt, sched = tiny()
    faults = Faults(monkeypatch, [ckpt])
    faults.arm(5, errno.ENOSPC)
    with pytest.raises(StorageError, match=r"\(No space left on device\); no earlier checkpoint was saved$"):
        save(tmp_path, 2, module, opt, sched)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- io helpers
def every_fault(monkeypatch, write, check, reset=lambda: None):
    """Count the writes ``write()`` does, then fail each in turn (after ``reset()``) and ``check(error)``."""
    faults = Faults(monkeypatch, [lio])
    faults.count()
    write()
    total = faults.n
    assert total >= 3 and {"write", "fsync", "replace"} <= set(faults.names)
    for k in range(1, total + 1):
        reset()
        faults.arm(k, CODES[k % 3])
        with pytest.raises(StorageError) as e:
            write()
        faults.count()
        check(str(e.value), CODES[k % 3], k)
    return total


@pytest.mark.parametrize("helper", ["write_json", "write_text", "write_jsonl"])
def test_atomic_file_writes_keep_the_earlier_file(tmp_path, monkeypatch, helper):
    path = tmp_path / "out" / "result.json"
    path.parent.mkdir()
    path.write_text("old contents\n")
    value = {"write_json": {"a": 1, "b": [1, 2]}, "write_text": "new text\n" * 50,
             "write_jsonl": [{"id": i} for i in range(20)]}[helper]

    def check(msg, code, k):
        assert msg == f"could not write {path} ({os.strerror(code)}); the earlier {path} is unchanged", k
        assert path.read_text() == "old contents\n", k
        assert hidden(path.parent) == [], k   # no temporary file left

    every_fault(monkeypatch, lambda: getattr(lio, helper)(path, value), check,
                reset=lambda: path.write_text("old contents\n"))


@pytest.mark.parametrize("proc", [True, False], ids=["proc-status", "os-umask"])
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_leave_the_mode_open_would(tmp_path, monkeypatch, umask, proc):
    """mkstemp/mkdtemp create 0600/0700; an atomic write must leave what a plain open() or mkdir leaves (a
    results.json or final/ folder shared with a group stays readable), and an existing file keeps its own mode."""
    if not proc:   # where /proc/self/status is missing (not Linux), the umask is read with os.umask
        monkeypatch.setattr(lio, "open", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError(a[0])),
                            raising=False)
    old = os.umask(umask)
    try:
        lio.write_text(tmp_path / "new.txt", "x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        assert (tmp_path / "new.txt").stat().st_mode & 0o7777 == (tmp_path / "plain.txt").stat().st_mode & 0o7777
        (tmp_path / "kept.txt").write_text("old")
        os.chmod(tmp_path / "kept.txt", 0o640)
        lio.write_json(tmp_path / "kept.txt", {"a": 1})
        assert (tmp_path / "kept.txt").stat().st_mode & 0o7777 == 0o640
        with lio.atomic_dir(tmp_path / "folder") as d:
            (d / "a").write_text("x")
        (tmp_path / "plain").mkdir()
        assert (tmp_path / "folder").stat().st_mode & 0o7777 == (tmp_path / "plain").stat().st_mode & 0o7777
    finally:
        os.umask(old)


def test_eval_predictions_save_keeps_the_earlier_seed_file(tmp_path, monkeypatch):
    from lmdistill.evaluate.store import save_seed

    pred, meta = tmp_path / "seed1.jsonl", tmp_path / "seed1.meta.json"
    save_seed(pred, meta, [{"id": "a", "output": "x"}], {"model": "m"}, {"rougeL": 1.0})
    old = pred.read_bytes(), meta.read_bytes()

    rows = [{"id": str(i), "output": "y" * 50} for i in range(30)]
    new = "".join(json.dumps(r) + "\n" for r in rows).encode()

    def check(msg, code, k):
        # the predictions are written first, then the meta: each file is whole, old or new, and the meta old
        failed = pred if pred.read_bytes() == old[0] else meta
        assert msg == f"could not write {failed} ({os.strerror(code)}); the earlier {failed} is unchanged", k
        assert pred.read_bytes() in (old[0], new) and meta.read_bytes() == old[1], k
        assert hidden(tmp_path) == [], k

    def reset():
        pred.write_bytes(old[0])
        meta.write_bytes(old[1])

    every_fault(monkeypatch, lambda: save_seed(pred, meta, rows, {"model": "m"}, {"rougeL": 2.0}), check, reset)


def test_a_failed_append_leaves_exactly_the_earlier_rows(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    with lio.JsonlAppender(path) as sink:
        for i in range(3):
            sink.append({"id": i, "text": "x" * 40})
    good = path.read_bytes()
    faults = Faults(monkeypatch, [lio])
    faults.count()
    lio.JsonlAppender(path).close()
    first_write = len(faults.names) + 1     # opening's operations, then the row's write
    for code in CODES:
        faults.arm(first_write, code)       # half of the row reaches the file before the error
        sink = lio.JsonlAppender(path)
        with pytest.raises(StorageError) as e:
            sink.append({"id": 3, "text": "y" * 4000})
        faults.count()
        assert str(e.value) == (f"could not write {path} ({os.strerror(code)}); every row before this one is "
                                "intact; rerun to continue")
        assert path.read_bytes() == good
        with pytest.raises(StorageError, match="append after a failed write"):
            sink.append({"id": 4})
        sink.close()
    with lio.JsonlAppender(path) as sink:   # the rerun continues the file
        sink.append({"id": 3})
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == [0, 1, 2, 3]


def test_atomic_dir_keeps_the_earlier_folder(tmp_path, monkeypatch):
    target = tmp_path / "final"
    target.mkdir()
    (target / "model.bin").write_text("old model")

    def export():
        with lio.atomic_dir(target) as tmp:
            with open(tmp / "model.bin", "w") as f:
                f.write("new model " * 100)
            lio.write_json(tmp / "config.json", {"a": 1})

    def check(msg, code, k):
        assert msg == f"could not write {target} ({os.strerror(code)}); the earlier {target} is unchanged", k
        assert sorted(p.name for p in target.iterdir()) == ["model.bin"], k
        assert (target / "model.bin").read_text() == "old model", k
        assert hidden(tmp_path) == [], k

    def reset():
        shutil.rmtree(target)
        target.mkdir()
        (target / "model.bin").write_text("old model")

    every_fault(monkeypatch, export, check, reset)


def test_library_errors_that_carry_an_os_code_are_storage_errors(tmp_path):
    """safetensors (Rust) reports a full disk in its own exception: still a StorageError naming the folder."""
    target = tmp_path / "final"
    with pytest.raises(StorageError, match=rf"^could not write {target} \(No space left on device\); no partial"):
        with lio.atomic_dir(target):
            raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                               '"No space left on device" })')
    assert not target.exists() and hidden(tmp_path) == []
    with pytest.raises(KeyError):   # anything else passes through untouched
        with lio.atomic_dir(target):
            raise KeyError("x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_a_read_only_folder_is_a_storage_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "a.json").write_text("{}")
    folder.chmod(0o500)
    try:
        with pytest.raises(StorageError, match=r"could not write .*a.json \(Permission denied\); the earlier"):
            lio.write_json(folder / "a.json", {"b": 2})
        assert (folder / "a.json").read_text() == "{}"
    finally:
        folder.chmod(0o700)


# ---------------------------------------------------------------------------------------------- real filesystems
def namespace_works() -> bool:
    if not shutil.which("unshare"):
        return False
    d = tempfile.mkdtemp()
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {d}"],
                           capture_output=True, timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        os.rmdir(d)


needs_tmpfs = pytest.mark.skipif(not namespace_works(), reason="no user+mount namespace to mount a tmpfs in")


def in_namespace(script: str, timeout=600) -> str:
    """Run ``script`` (sh) in a private user+mount namespace, where it may mount tmpfs; its output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LMD": f"{sys.executable} -m lmdistill"}
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def train_args(model_dirs, out, **extra):
    o = {"student": model_dirs["student"], "teacher": model_dirs["teacher"], "output_dir": str(out),
         "max_train_examples": 8, "batch_size": 4, "micro_batch_size": 2, "valid_data": "", "save_steps": 2,
         "eval_steps": 1000, "progress": False, "max_length": 96, "max_prompt_length": 80, "device": "cpu",
         "keep_checkpoints": 2, "max_steps": 4, **extra}
    return " ".join(f"{k}={v}" for k, v in o.items())


@needs_tmpfs
def test_train_on_a_full_then_read_only_disk(model_dirs, tmp_path):
    """The issue's probe: the second checkpoint does not fit. One line naming the last good checkpoint; after
    space is freed, --resume completes. Then a read-only filesystem: one line, nothing changed."""
    disk, keep = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    run = disk / "run"
    args = train_args(model_dirs, run)
    out = in_namespace(f"""
        mount -t tmpfs -o size=2m tmpfs {disk}
        $LMD train kd {args} > {tmp_path}/full.log 2>&1; echo "rc_full=$?"
        cp -r {run} {tmp_path}/after_full
        mount -o remount,size=64m {disk}
        $LMD train kd {args} --resume > {tmp_path}/resume.log 2>&1; echo "rc_resume=$?"
        mount -o remount,ro {disk}
        $LMD train kd {train_args(model_dirs, run, max_steps=6)} --resume > {tmp_path}/ro.log 2>&1; echo "rc_ro=$?"
        cp -r {run} {keep}
    """)
    full = (tmp_path / "full.log").read_text()
    assert "rc_full=2" in out, full[-3000:]
    assert "Traceback" not in full
    step2, step4 = run / "checkpoints" / "step-0000002", run / "checkpoints" / "step-0000004"
    assert full.strip().splitlines()[-1] == (f"error: could not write {step4} (No space left on device); the last "
                                             f"good checkpoint is {step2}, resume with --resume")
    after = tmp_path / "after_full" / "checkpoints"
    assert [p.name for p in ckpt.checkpoint_dirs(after)] == ["step-0000002"]
    assert ckpt.verify_checkpoint(after / "step-0000002") is None and hidden(after) == []
    resumed = (tmp_path / "resume.log").read_text()
    assert "rc_resume=0" in out, resumed[-3000:]
    assert f"resumed from {step2} at step 2" in resumed
    ro = (tmp_path / "ro.log").read_text()
    assert "rc_ro=2" in out and "Traceback" not in ro, ro[-3000:]
    last = ro.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write {run}/") and "(Read-only file system); the earlier" in last
    kept = keep / "checkpoints"
    assert [p.name for p in ckpt.checkpoint_dirs(kept)] == ["step-0000002", "step-0000004"]
    assert all(ckpt.verify_checkpoint(p) is None for p in ckpt.checkpoint_dirs(kept))
    assert (keep / "final" / "model.safetensors").exists()


@needs_tmpfs
def test_generate_on_a_full_disk_then_rerun(model_dirs, tmp_path):
    """Rows that stop fitting: one line, every written row whole; the rerun with space adds the rest, and the
    output equals an uninterrupted run's (no row lost or repeated)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    gen = (f"generate --policy student --student {model_dirs['student']} --data dolly:train --limit 12 "
           f"--max-new-tokens 24 --batch-size 2 --seed 3")
    ref = tmp_path / "ref.jsonl"
    out = in_namespace(f"""
        $LMD {gen} --out {ref} > {tmp_path}/ref.log 2>&1; echo "rc_ref=$?"
        mount -t tmpfs -o size=8k tmpfs {disk}
        $LMD {gen} --out {disk}/gen.jsonl > {tmp_path}/full.log 2>&1; echo "rc_full=$?"
        cp {disk}/gen.jsonl {tmp_path}/partial.jsonl
        mount -o remount,size=1m {disk}
        $LMD {gen} --out {disk}/gen.jsonl > {tmp_path}/rerun.log 2>&1; echo "rc_rerun=$?"
        cp {disk}/gen.jsonl {tmp_path}/gen.jsonl
    """)
    assert "rc_ref=0" in out, (tmp_path / "ref.log").read_text()[-3000:]
    full = (tmp_path / "full.log").read_text()
    assert "rc_full=2" in out and "Traceback" not in full, full[-3000:]
    assert full.strip().splitlines()[-1] == (f"error: could not write {disk}/gen.jsonl (No space left on device); "
                                             "every row before this one is intact; rerun to continue")
    partial = (tmp_path / "partial.jsonl").read_text()
    assert partial.endswith("\n") and 0 < len(partial.splitlines()) < len(ref.read_text().splitlines())
    assert all(json.loads(line)["id"] for line in partial.splitlines())   # every row whole
    assert "rc_rerun=0" in out, (tmp_path / "rerun.log").read_text()[-3000:]
    assert (tmp_path / "gen.jsonl").read_text() == ref.read_text()


def test_a_signal_during_an_append_lands_after_the_row_is_whole_and_counted(tmp_path, monkeypatch):
    """SIGTERM turned into KeyboardInterrupt (the CLI's TerminateAsInterrupt) arriving while a row is being written:
    the row is finished, fsynced and counted first, then the interrupt is raised, so the file and the "kept N rows"
    message agree (CI once saw them differ by a row when the signal fell between the write and the count)."""
    import signal

    import lmdistill.io as lio

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    real_fsync, calls = os.fsync, []

    def fsync_with_a_signal(fd):   # the signal arrives in the middle of the append, before its bookkeeping
        calls.append(fd)
        os.kill(os.getpid(), signal.SIGTERM)
        real_fsync(fd)

    try:
        path = tmp_path / "rows.jsonl"
        appender = lio.JsonlAppender(path)
        appender.append({"id": "a"})
        monkeypatch.setattr(lio.os, "fsync", fsync_with_a_signal)
        with pytest.raises(KeyboardInterrupt):
            appender.append({"id": "b"})
        monkeypatch.setattr(lio.os, "fsync", real_fsync)
        assert calls and path.read_text().splitlines() == ['{"id": "a"}', '{"id": "b"}']
        assert lio._APPENDED[path] == 2
        assert signal.getsignal(signal.SIGTERM) is interrupt   # the handler is back after each append
        appender.append({"id": "c"})
        assert signal.getsignal(signal.SIGTERM) is interrupt and lio._APPENDED[path] == 3
        appender.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
