"""What a data file is, before its rows are read: the text encoding and, for a ``.jsonl`` file, whether it holds
JSON Lines at all. Each mistake is one whole-file ``Problem`` naming the fix, instead of an error on every line.

* A UTF-8 byte-order mark (Notepad, Excel exports) is accepted: it is not data (``BOM_UTF8``, skipped by the readers).
* UTF-16 and UTF-32, little or big endian, with or without a byte-order mark, are named with the ``iconv`` command
  that converts them. Without a mark the encoding shows in the zero bytes of the first character, which JSON text
  is ASCII (``{``, ``[`` or white space; RFC 8259 section 8.1 requires UTF-8, RFC 4627 section 3 gave this rule):
  UTF-32 BE ``00 00 00 xx``, UTF-32 LE ``xx 00 00 00``, UTF-16 BE ``00 xx 00 xx``, UTF-16 LE ``xx 00 xx 00``.
* A JSON array saved as ``.jsonl`` (its first line is ``[`` or the whole array) is refused with the two fixes:
  rename it to ``.json`` (read as a list of rows) or write one row per line. It is not guessed at: a ``.jsonl``
  file's errors name lines, and an array's would name list positions.
"""

from __future__ import annotations

import codecs
import json
import shlex
from pathlib import Path

from lmdistill.errors import Problem

BOM_UTF8 = codecs.BOM_UTF8
#: Byte-order marks, UTF-32's first (UTF-32 LE's mark begins with UTF-16 LE's).
WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32", "LE"), (codecs.BOM_UTF32_BE, "UTF-32", "BE"),
             (codecs.BOM_UTF16_LE, "UTF-16", "LE"), (codecs.BOM_UTF16_BE, "UTF-16", "BE"))
#: How a JSON file's first character starts in each encoding (zero bytes as 0, the character's byte as 1).
ZERO_PATTERNS = (((0, 0, 0, 1), "UTF-32", "BE"), ((1, 0, 0, 0), "UTF-32", "LE"),
                 ((0, 1, 0, 1), "UTF-16", "BE"), ((1, 0, 1, 0), "UTF-16", "LE"))


def wide_encoding(head: bytes) -> tuple[str, str, bool] | None:
    """``(encoding, byte order, has a byte-order mark)`` of text in UTF-16 or UTF-32 from its first bytes, or None.

    Without a mark the zero-byte pattern of the first four bytes must match and decode to a printable ASCII
    character or white space (as JSON's first character is), so other binary data is not called UTF-16."""
    for bom, name, order in WIDE_BOMS:
        if head.startswith(bom):
            return name, order, True
    if len(head) < 4:
        return None
    pattern = tuple(int(b != 0) for b in head[:4])
    for zeros, name, order in ZERO_PATTERNS:
        if pattern == zeros:
            unit = 4 if name == "UTF-32" else 2
            first = head[:unit].decode(f"{name}-{order}", errors="replace")
            return (name, order, False) if first.isascii() and (first.isprintable() or first in "\t\r\n") else None
    return None


def encoding_problem(path: Path, head: bytes) -> Problem | None:
    """``FILE: the file is UTF-16 (LE), not UTF-8; convert it: iconv ...``, or None for UTF-8 (or bytes)."""
    found = wide_encoding(head)
    if found is None:
        return None
    name, order, bom = found
    source = name if bom else f"{name}{order}"   # iconv reads a mark and drops it; without one it must be told
    target = path.with_name(f"{path.stem}.utf8{path.suffix}")
    return Problem(str(path), None, None,
                   f"the file is {name} ({order}{', with a byte-order mark' if bom else ''}), not UTF-8; convert it "
                   f"to UTF-8, e.g. iconv -f {source} -t UTF-8 {shlex.quote(str(path))} > "
                   f"{shlex.quote(str(target))}")


def _first_text_line(path: Path) -> bytes:
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            raw = raw[len(BOM_UTF8):] if i == 0 and raw.startswith(BOM_UTF8) else raw
            if raw.strip():
                return raw.strip()
    return b""


def json_array_problem(path: Path) -> Problem | None:
    """A ``.jsonl`` file that holds one JSON array (pretty-printed, or on one line) rather than one object per line."""
    first = _first_text_line(path)
    if not first.startswith(b"["):
        return None
    try:
        json.loads(first)
    except (ValueError, RecursionError):
        pass   # "[" alone, or "[{...}," : the start of an array written over many lines
    else:
        with open(path, "rb") as f:   # a one-line array is the whole file; arrays on many lines are rows (refused)
            if sum(1 for raw in f if raw.strip()) > 1:
                return None
    rows = path.with_name(f"{path.stem}.rows.jsonl")
    return Problem(str(path), None, None,
                   "holds a JSON array, not JSON Lines (one object per line); rename it to "
                   f"{path.with_suffix('.json').name} (a .json file is read as a list of rows), or write one row per "
                   f"line, e.g. jq -c '.[]' {shlex.quote(str(path))} > {shlex.quote(str(rows))}")


def file_problem(path: Path) -> Problem | None:
    """The whole-file problem of a data file (its encoding; a JSON array in a ``.jsonl`` file), or None."""
    with open(path, "rb") as f:
        head = f.read(4)
    return encoding_problem(path, head) or (json_array_problem(path) if path.suffix != ".json" else None)
