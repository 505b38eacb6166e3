"""Integrity of a teacher cache's shards: their manifest entries, the checks against them, and the one-line error
that names a damaged shard, the rows it holds and the command that rewrites it.

Each shard's entry in the manifest's ``shard_files`` list (index = shard number) is
``{"file", "size", "sha256", "rows": [first, last], "ids": [first id, last id]}``: ``size`` and ``sha256`` of the
bytes written, ``rows`` the 0-based range of captured rows (after the prompt filter, in data order) it holds.
The manifest is rewritten atomically after each shard is written, so an entry never names bytes not yet on disk.
Rerunning the capture command with the same arguments keeps every shard that matches its entry and rewrites the
damaged ones (``teachers/capture.py``).
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

from lmdistill.errors import ConfigError

SHARD_FILES = "shard_files"
#: Capture options recorded in the manifest, as ``(flag, manifest field)``: every one is written into the repair
#: command (none left to a default that may change), so it recomputes a shard exactly as the first run did.
COMMAND_FLAGS = (("--top-k", "top_k"), ("--limit", "limit"), ("--template", "template"),
                 ("--max-prompt-length", "max_prompt_length"), ("--max-length", "max_length"),
                 ("--temperature", "temperature"), ("--logprob-dtype", "logprob_dtype"), ("--shard-rows", "shard_rows"),
                 ("--batch-size", "batch_size"), ("--dtype", "dtype"))
#: How many damaged shards one message names before "and N more".
SHOWN = 5


class DamagedCacheError(ConfigError):
    """A teacher-cache shard is missing, truncated, changed or unreadable. ``shards`` holds the damaged shard
    numbers; the message names each with its rows and gives the ``lmdistill capture`` command that rewrites them."""

    def __init__(self, message: str, shards: list[int]):
        super().__init__(message)
        self.shards = list(shards)


def shard_entry(name: str, data: bytes, first_row: int, n_rows: int, ids: tuple[str, str]) -> dict:
    """The manifest entry of a shard whose file holds ``data``."""
    return {"file": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "rows": [first_row, first_row + n_rows - 1], "ids": list(ids)}


def _valid_entry(e, index: int) -> bool:
    return (isinstance(e, dict) and e.get("file") == f"shard-{index:05d}.npz" and isinstance(e.get("size"), int)
            and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64)


def shard_entries(manifest: dict, root: Path, *, complete: bool = True) -> list[dict] | None:
    """The manifest's shard entries, one per shard; None for a cache written before shards had checksums. A
    ``complete`` manifest must list every shard; a list that is malformed or of another length is a damaged
    manifest (:class:`DamagedCacheError`: rerunning the capture rebuilds it from the shards)."""
    if SHARD_FILES not in manifest:
        return None
    entries = manifest[SHARD_FILES]
    n = manifest.get("shards")
    ok = isinstance(entries, list) and (not complete or len(entries) == n)
    ok = ok and all(e is None and not complete or _valid_entry(e, i) for i, e in enumerate(entries))
    if not ok:
        got = f"{len(entries)} entries" if isinstance(entries, list) else f"a {type(entries).__name__}"
        raise DamagedCacheError(f"teacher: cache:{root}: manifest.json is damaged: its {SHARD_FILES} holds {got} "
                                f"for {n} shards, or malformed ones; {repair_hint(manifest, root)}", [])
    return entries


def check_size(path: Path, entry: dict | None) -> str | None:
    """Why ``path`` cannot be the shard ``entry`` records, from its size alone (None: it may be)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if entry is not None and size != entry["size"]:
        return (f"is truncated ({size} bytes, the manifest records {entry['size']})" if size < entry["size"] else
                f"is {size} bytes, the manifest records {entry['size']}")
    return None


def entry_problem(data: bytes, entry: dict | None, verify: bool = True) -> str | None:
    """Why the bytes ``data`` are not the shard ``entry`` records: its size, and with ``verify`` its SHA-256."""
    if entry is None:
        return None
    if len(data) != entry["size"]:
        return (f"is truncated ({len(data)} bytes, the manifest records {entry['size']})" if len(data) < entry["size"]
                else f"is {len(data)} bytes, the manifest records {entry['size']}")
    if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return "does not match its SHA-256 in the manifest (its bytes changed on disk)"
    return None


def unreadable(e: BaseException) -> str:
    return f"cannot be decoded ({e})"


def rows_held(manifest: dict, s: int) -> str:
    """``rows 65-128 of 500, ids "a" to "b"`` (1-based captured rows) for shard ``s``."""
    entries = manifest.get(SHARD_FILES)
    entry = entries[s] if isinstance(entries, list) and s < len(entries) and isinstance(entries[s], dict) else {}
    total, per = manifest.get("rows"), manifest.get("shard_rows")
    rows = entry.get("rows")
    if not (isinstance(rows, list) and len(rows) == 2) and isinstance(per, int) and isinstance(total, int):
        rows = [s * per, min(total, (s + 1) * per) - 1]
    out = f"rows {rows[0] + 1}-{rows[1] + 1} of {total}" if isinstance(rows, list) and len(rows) == 2 else "rows ?"
    ids = entry.get("ids")
    if isinstance(ids, list) and len(ids) == 2 and all(isinstance(i, str) and i for i in ids):
        out += f", ids {ids[0]!r} to {ids[1]!r}"
    return out


def capture_command(manifest: dict, root: Path) -> str | None:
    """The ``lmdistill capture`` command that wrote this cache, into ``root``; None when the manifest lacks it."""
    if not all(isinstance(manifest.get(k), str) for k in ("teacher", "data")):
        return None
    words = ["lmdistill", "capture", "--teacher", manifest["teacher"], "--data", manifest["data"], "--out", str(root)]
    for flag, key in COMMAND_FLAGS:
        if manifest.get(key) is not None:
            words += [flag, str(manifest[key])]
    return shlex.join(words)


def repair_hint(manifest: dict, root: Path) -> str:
    command = capture_command(manifest, root)
    what = f"`{command}`" if command else "the `lmdistill capture` command that wrote it"
    return f"rerun {what} to rewrite only the damaged shard(s)"


def damaged_error(root: Path, manifest: dict, bad: list[tuple[int, str]]) -> DamagedCacheError:
    """One line: every damaged shard (the first ``SHOWN``) with its rows and what is wrong, then the repair."""
    named = [f"shard-{s:05d}.npz ({rows_held(manifest, s)}) {why}" for s, why in bad[:SHOWN]]
    if len(bad) > SHOWN:
        named.append(f"and {len(bad) - SHOWN} more shard(s)")
    return DamagedCacheError(f"teacher: cache:{root} is damaged: {'; '.join(named)}; {repair_hint(manifest, root)}",
                             [s for s, _ in bad])
