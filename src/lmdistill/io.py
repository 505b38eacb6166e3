"""Crash-safe file writing: atomic replaces and durable JSONL appends.

A write that fails for want of space, permission or a writable filesystem (``WRITE_ERRNOS``) raises
``StorageError``: one line naming the path, the reason and what was left intact (the earlier file, folder or
rows), never a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from lmdistill.errors import Problem, StorageError

#: The errors of a write the user can fix by freeing space, fixing permissions or choosing another folder.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})

#: What this process has made durable, for the message of a command stopped by a signal: rows appended per
#: JSONL file and files written whole (``kept_summary``).
_APPENDED: dict[Path, int] = {}
_WRITTEN: dict[str, Any] = {"files": 0, "last": None}


def kept_summary(limit: int = 4) -> str:
    """``"12 rows appended to a.jsonl; 3 files written (last: b.json)"``, or ``""`` when nothing was kept."""
    parts = [f"{n} row{'s' * (n != 1)} appended to {p}" for p, n in list(_APPENDED.items())[:limit]]
    if len(_APPENDED) > limit:
        parts.append(f"rows appended to {len(_APPENDED) - limit} more file(s)")
    if _WRITTEN["files"]:
        parts.append(f"{_WRITTEN['files']} file(s) written whole (last: {_WRITTEN['last']})")
    return "; ".join(parts)


def write_errno(exc: BaseException) -> int | None:
    """The ``WRITE_ERRNOS`` code behind ``exc`` (an ``OSError``, one in its chain, or a Rust library's
    ``Os { code: N, .. }`` message such as safetensors'), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            return exc.errno
        m = re.search(r"Os \{ code: (\d+)", str(exc))
        if m and int(m.group(1)) in WRITE_ERRNOS:
            return int(m.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def storage_error(path: str | os.PathLike, code: int, kept: str) -> StorageError:
    """``could not write PATH (REASON); KEPT``."""
    return StorageError(f"could not write {path} ({os.strerror(code)}); {kept}", path=str(path), errno=code)


def os_storage_error(exc: BaseException) -> StorageError | None:
    """A one-line error for a write that failed outside the helpers above (which say what they kept): the
    ``WRITE_ERRNOS`` ``OSError`` with a file name behind ``exc`` (itself or in its chain) as ``could not write PATH
    (REASON)``, or ``could not access PATH (Permission denied)``; None when there is none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS and exc.filename:
            verb = "access" if exc.errno in (errno.EACCES, errno.EPERM) else "write"
            return StorageError(f"could not {verb} {os.fsdecode(exc.filename)} ({os.strerror(exc.errno)})",
                                path=os.fsdecode(exc.filename), errno=exc.errno)
        exc = exc.__cause__ or exc.__context__
    return None


def _kept_file(path: Path, existed: bool) -> str:
    return f"the earlier {path} is unchanged" if existed else "no partial file was left"


def _open_mode(path: Path, existed: bool, full: int = 0o666) -> int:
    """The permission bits ``open(path, "w")`` (``full`` 0o666) or ``mkdir`` (0o777) would leave: the existing
    path's, else ``full`` less the umask (``mkstemp``/``mkdtemp`` make 0600/0700)."""
    if existed:
        try:
            return path.stat().st_mode & 0o7777
        except OSError:
            pass
    return full & ~_umask()


def _umask() -> int:
    """The process umask, read without setting it where Linux reports it (``os.umask`` must set it to read it, a
    window in which another thread's new file would get the wrong mode)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never a half-written file. A failed write
    (``WRITE_ERRNOS``) removes the temporary file and raises ``StorageError``; the earlier file stays.
    """
    path = Path(path)
    existed = path.exists()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, _open_mode(path, existed))
        binary = "b" in mode
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _WRITTEN["files"] += 1
        _WRITTEN["last"] = path
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        code = None if isinstance(e, StorageError) else write_errno(e)
        if code is not None:
            raise storage_error(path, code, _kept_file(path, existed)) from None
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back for the block's duration and handed to their handlers when it ends, so a signal
    turned into ``KeyboardInterrupt`` cannot cut a write between its bytes and its bookkeeping. The Python-level
    handlers are swapped (a thread's signal mask would not do: the kernel hands a process's signal to any thread
    that does not block it, and Python then runs the handler in the main thread anyway). Does nothing off the main
    thread, or where a handler was not installed from Python."""
    import signal
    import threading

    names = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or any(signal.getsignal(n) is None for n in names):
        yield
        return
    pending: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for n in names:
            previous[n] = signal.signal(n, lambda signum, _frame: pending.append(signum))
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(n, handler)
        for n in dict.fromkeys(pending):
            signal.raise_signal(n)   # now, to the handler it was meant for


class JsonlAppender:
    """Append one JSON object per line, written and fsynced before ``append`` returns.

    Opening repairs a torn last line left by a crash (kill -9 mid-write) by truncating it,
    so every line in the file is a whole record and a rerun can trust what it reads. An append that fails
    (``WRITE_ERRNOS``) cuts the file back to its earlier rows and raises ``StorageError``.
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self._f = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            truncate_torn_tail(self.path)
            self._f = open(self.path, "ab", buffering=0)
        except OSError as e:
            code = write_errno(e)
            if code is None:
                raise
            raise storage_error(self.path, code, "nothing was appended") from None
        self._size = self._f.seek(0, os.SEEK_END)

    def append(self, row: dict) -> None:
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        if self._f is None:
            raise StorageError(f"{self.path}: append after a failed write")
        with signals_deferred():   # a Ctrl-C or SIGTERM lands after the row is whole and counted, never inside
            self._append(data)

    def _append(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[self._f.write(view):]
            if self.fsync:
                os.fsync(self._f.fileno())
        except OSError as e:
            code = write_errno(e)
            try:   # cut the partial line off: the file holds exactly the rows before this one
                os.ftruncate(self._f.fileno(), self._size)
            except OSError:
                pass
            self._f.close()
            self._f = None
            if code is None:
                raise
            raise storage_error(self.path, code, "every row before this one is intact; rerun to continue") from None
        self._size += len(data)
        _APPENDED[self.path] = _APPENDED.get(self.path, 0) + 1

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def truncate_torn_tail(path: str | os.PathLike) -> int:
    """Cut a trailing partial line (no newline, or not valid JSON) off ``path``; return bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data:
        return 0
    keep = len(data)
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
        try:
            json.loads(data[last_start:])
        except (ValueError, RecursionError):
            keep = last_start
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return len(data) - keep


def iter_jsonl_rows(path: str | os.PathLike) -> Iterator[tuple[int, Any, Problem | None]]:
    """``(1-based line, decoded JSON or None, Problem or None)`` for each non-blank line of a user's JSONL file.

    Undecodable bytes and malformed JSON become a ``Problem`` naming the file and line, never an exception, so
    callers can report every bad line at once (or skip them and say which). A UTF-8 byte-order mark opening the
    file (Notepad, Excel exports) is not data and is skipped.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            skip = 3 if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else 0
            try:
                text = raw[skip:].decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, Problem(str(path), lineno, None, f"is not valid UTF-8 (byte {e.start + skip})")
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except (ValueError, RecursionError) as e:
                yield lineno, None, Problem(str(path), lineno, None, json_problem(e))
                continue
            yield lineno, value, None


def json_problem(e: ValueError | RecursionError) -> str:
    """What is wrong with JSON text that ``json.loads`` refused: a syntax error (``JSONDecodeError``), a number too
    long to convert (Python's 4300-digit limit: a plain ``ValueError``) or nesting deeper than the recursion
    limit (``RecursionError``)."""
    if isinstance(e, json.JSONDecodeError):
        return f"is not valid JSON ({e.msg} at column {e.colno})"
    if isinstance(e, RecursionError):
        return "is not valid JSON (nested too deeply to read)"
    return f"is not valid JSON ({str(e).split(';')[0].split(': value has')[0]})"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read whole JSONL records (skipping blank lines). For user files use ``lmdistill.data``."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success replace ``path`` with it in one rename.

    A failed write inside it or of it (``WRITE_ERRNOS``, also from libraries that report them in their own
    exception) removes the temporary folder and raises ``StorageError``; the earlier ``path`` stays.
    """
    path = Path(path)
    existed = path.exists()
    tmp = tmp_name = old = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        os.chmod(tmp, _open_mode(path, existed, 0o777))
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not path.exists():
                try:
                    os.replace(old, path)   # put the earlier folder back
                except OSError:
                    pass
        kept = f"the earlier {path} is unchanged" if existed else "no partial folder was left"
        inside = isinstance(e, StorageError) and e.path and tmp_name is not None and tmp_name in Path(e.path).parents
        if inside:   # a helper's write into the temporary folder: name the folder the user asked for
            raise storage_error(path, e.errno or errno.EIO, kept) from None
        code = None if isinstance(e, StorageError) else write_errno(e)
        if code is not None:
            raise storage_error(path, code, kept) from None
        raise


def link_dir(path: str | os.PathLike, target: str) -> None:
    """Make ``path`` a symbolic link to ``target`` (relative to ``path``'s folder), replacing what was there in one
    rename (a folder there is removed after the link is in place)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.link-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    old = None
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
