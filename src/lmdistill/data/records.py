"""Load instruction data (JSONL, JSON, folders, hub datasets) into validated ``Example`` rows.

Every bad row is reported as ``file:line: field "x" ...``; a required field that is missing next to an unknown one
that looks like it gets ``did you mean "ouput"?`` (else the unknown fields and the ones read are listed). By default
any bad row raises one ``DataError`` listing them all; with ``skip_bad=True`` bad rows are skipped and reported in
``LoadResult.skipped``, never dropped silently. A file in another encoding than UTF-8 (a UTF-8 byte-order mark is
fine) or a JSON array saved as ``.jsonl`` is one whole-file problem naming the fix (``sniff.py``), never skipped.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lmdistill.data.registry import BENCHMARKS, resolve
from lmdistill.data.sniff import BOM_UTF8, file_problem
from lmdistill.errors import DataError, Problem
from lmdistill.io import iter_jsonl_rows, json_problem

ROLES = ("system", "user", "assistant")
#: The fields a row is read from (any other is ignored, and offered as a did-you-mean for a missing one).
FIELDS = ("instruction", "input", "output", "references", "messages", "id", "source", "teacher")
MESSAGE_FIELDS = ("role", "content")


@dataclass
class Example:
    """One instruction-following example.

    ``output`` is the gold response; ``references`` holds every acceptable reference (the gold
    response first) for metrics that take the max over references. Chat rows keep ``messages``
    (the conversation before the answer); their ``instruction`` is the last user turn. ``teacher`` names the
    teacher that reads the row when a run has several (``teachers:``); ``origin`` is where it was read
    (``file:line``), for messages.
    """

    id: str
    instruction: str
    input: str = ""
    output: str = ""
    references: list[str] = field(default_factory=list)
    messages: list[dict] | None = None
    source: str = ""
    teacher: str = ""
    origin: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.references and self.output:
            self.references = [self.output]


@dataclass
class LoadResult:
    examples: list[Example]
    skipped: list[Problem]
    path: str

    def report(self) -> str:
        if not self.skipped:
            return f"{self.path}: loaded {len(self.examples)} rows"
        lines = sorted({p.line for p in self.skipped if p.line is not None})
        return (f"{self.path}: loaded {len(self.examples)} rows, skipped {len(lines)} bad row(s) "
                f"at line(s) {', '.join(map(str, lines))}")


#: A string JSON can hold but no tokenizer or UTF-8 file can: a lone UTF-16 surrogate from a ``\ud800`` escape.
NOT_UNICODE = "is not valid Unicode (holds a lone UTF-16 surrogate, an unpaired \\ud800-\\udfff escape)"


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _quoted(key: str) -> str:
    """``key`` in JSON quotes, on one line: JSON escapes the control characters; the three other characters that
    break a line (NEL, LINE and PARAGRAPH SEPARATOR) are escaped too, so a message stays one ``FILE:LINE:`` line."""
    text = json.dumps(key, ensure_ascii=False)
    return text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def missing_hint(key: str, obj: dict, known: tuple[str, ...] = FIELDS) -> str:
    """What to add to ``is missing`` for ``key``: ``; did you mean "ouput"?`` when one of the row's unknown fields
    looks like it (difflib ratio >= 0.75, case ignored), else the unknown fields and the ones read, else nothing."""
    unknown = [k for k in obj if isinstance(k, str) and k not in known and is_unicode(k)]
    if not unknown:
        return ""
    lower = {k.lower(): k for k in reversed(unknown)}
    close = difflib.get_close_matches(key.lower(), list(lower), n=1, cutoff=0.75)
    if close:
        return f"; did you mean {_quoted(lower[close[0]])}?"
    shown = ", ".join(_quoted(k[:40]) for k in unknown[:5])
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    return f" (the row has {shown}{more}; the fields read are {', '.join(known)})"


def _check_str(obj: dict, key: str, path: str, line: int, problems: list[Problem],
               required: bool, nonempty: bool = False) -> str:
    if key not in obj or obj[key] is None:
        if required:
            problems.append(Problem(path, line, key, "is missing" + (missing_hint(key, obj) if key not in obj
                                                                     else "")))
        return ""
    val = obj[key]
    if not isinstance(val, str):
        problems.append(Problem(path, line, key, f"must be a string, got {type(val).__name__}"))
        return ""
    if not is_unicode(val):
        problems.append(Problem(path, line, key, NOT_UNICODE))
        return ""
    if nonempty and not val.strip():
        problems.append(Problem(path, line, key, "is empty"))
    return val


def parse_row(obj: Any, path: str, line: int, *, require_output: bool = True) -> tuple[Example | None, list[Problem]]:
    """Validate one decoded row; return the example (or None) and the problems found."""
    problems: list[Problem] = []
    if not isinstance(obj, dict):
        return None, [Problem(path, line, None, f"row must be a JSON object, got {type(obj).__name__}")]
    rid = obj.get("id", f"{Path(path).stem}-{line}")
    if not isinstance(rid, (str, int)):
        problems.append(Problem(path, line, "id", f"must be a string or integer, got {type(rid).__name__}"))
    elif isinstance(rid, str) and not is_unicode(rid):
        problems.append(Problem(path, line, "id", NOT_UNICODE))
    source = obj.get("source", "")
    source = source if isinstance(source, str) and is_unicode(source) else ""
    teacher = _check_str(obj, "teacher", path, line, problems, required=False)   # several teachers: who reads it
    where = {"teacher": teacher, "origin": f"{path}:{line}"}

    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return None, problems + [Problem(path, line, "messages", "must be a non-empty list of {role, content}")]
        clean = []
        for i, m in enumerate(msgs):
            fname = f"messages[{i}]"
            if not isinstance(m, dict):
                problems.append(Problem(path, line, fname, "must be an object with role and content"))
                continue
            if "role" not in m:
                problems.append(Problem(path, line, f"{fname}.role",
                                        "is missing" + missing_hint("role", m, MESSAGE_FIELDS)))
            elif m["role"] not in ROLES:
                problems.append(Problem(path, line, f"{fname}.role", f"must be one of {', '.join(ROLES)}, got {m.get('role')!r}"))
            if "content" not in m:
                problems.append(Problem(path, line, f"{fname}.content",
                                        "is missing" + missing_hint("content", m, MESSAGE_FIELDS)))
            elif not isinstance(m["content"], str):
                problems.append(Problem(path, line, f"{fname}.content", "is missing or not a string"))
            elif not is_unicode(m["content"]):
                problems.append(Problem(path, line, f"{fname}.content", NOT_UNICODE))
            clean.append({"role": m.get("role"), "content": m.get("content")})
        if problems:
            return None, problems
        if clean[-1]["role"] == "assistant":
            history, output = clean[:-1], clean[-1]["content"]
        else:
            history, output = clean, ""
        if require_output and not output.strip():
            return None, [Problem(path, line, "messages", "has no non-empty final assistant turn (the response)")]
        users = [m for m in history if m["role"] == "user"]
        if not users:
            return None, [Problem(path, line, "messages", "has no user turn")]
        return Example(id=str(rid), instruction=users[-1]["content"], output=output, messages=history,
                       source=source, **where), []

    instruction = _check_str(obj, "instruction", path, line, problems, required=True, nonempty=True)
    inp = _check_str(obj, "input", path, line, problems, required=False)
    output = _check_str(obj, "output", path, line, problems, required=require_output, nonempty=require_output)
    refs = obj.get("references")
    references: list[str] = []
    if refs is not None:
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            problems.append(Problem(path, line, "references", "must be a list of strings"))
        elif not all(is_unicode(r) for r in refs):
            problems.append(Problem(path, line, "references", NOT_UNICODE))
        else:
            references = [r for r in refs]
    if problems:
        return None, problems
    if output and output not in references:
        references = [output] + references
    return Example(id=str(rid), instruction=instruction, input=inp, output=output,
                   references=references, source=source, **where), []


def _iter_json(path: Path) -> Iterable[tuple[int, Any, Problem | None]]:
    raw = path.read_bytes()
    skip = len(BOM_UTF8) if raw.startswith(BOM_UTF8) else 0   # a UTF-8 byte-order mark is not data
    raw = raw[skip:]
    if not raw.strip():
        return   # no rows: the caller says the file is empty
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        yield line, None, Problem(str(path), line, None, f"is not valid UTF-8 (byte {e.start + skip})")
        return
    except json.JSONDecodeError as e:
        yield e.lineno, None, Problem(str(path), e.lineno, None, json_problem(e))
        return
    except (ValueError, RecursionError) as e:   # a 4300-digit number, nesting past the recursion limit
        yield 1, None, Problem(str(path), None, None, json_problem(e))
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        yield 1, None, Problem(str(path), None, None, "must hold a JSON list of rows (or {\"data\": [...]})")
        return
    for i, obj in enumerate(data, start=1):  # "line" is the 1-based row index in a JSON list
        yield i, obj, None


def load_file(path: str | Path, *, skip_bad: bool = False, require_output: bool = True) -> LoadResult:
    """Load one .jsonl or .json file."""
    path = Path(path)
    if not path.exists():
        raise DataError([Problem(str(path), None, None, "does not exist")])
    whole = file_problem(path)
    if whole is not None:   # another encoding, or not JSON Lines: one line naming the fix, not one per row
        raise DataError([whole])
    rows = _iter_json(path) if path.suffix == ".json" else iter_jsonl_rows(path)
    examples: list[Example] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    count = 0
    for lineno, obj, problem in rows:
        count += 1
        if problem is not None:
            problems.append(problem)
            continue
        ex, probs = parse_row(obj, str(path), lineno, require_output=require_output)
        if ex is not None and ex.id in seen:
            probs = [Problem(str(path), lineno, "id", f"duplicates the id {ex.id!r} of line {seen[ex.id]}")]
            ex = None
        if probs:
            problems.extend(probs)
        elif ex is not None:
            seen[ex.id] = lineno
            examples.append(ex)
    if not count:   # 0 bytes, only blank lines, or an empty JSON list: say so, not "no rows left after filtering"
        text = path.read_bytes().removeprefix(BOM_UTF8).strip()
        empty = "holds no rows (an empty JSON list)" if path.suffix == ".json" and text else "the file is empty"
        raise DataError([Problem(str(path), None, None, empty)])
    if problems and not skip_bad:
        raise DataError(problems)
    return LoadResult(examples, problems, str(path))


def load_examples(source: str | Path, *, split: str | None = None, skip_bad: bool = False,
                  require_output: bool = True) -> LoadResult:
    """Load instruction data from a bundled benchmark name (``dolly`` or ``dolly:valid``), a file,
    a folder of .jsonl/.json files, or a hub dataset (``hf:NAME`` or ``hf:NAME:SPLIT``)."""
    src = str(source)
    name = src.split(":", 1)[0]
    if name in BENCHMARKS and not Path(src).exists():
        bench_split = src.split(":", 1)[1] if ":" in src else split
        return load_file(resolve(name, bench_split), skip_bad=skip_bad, require_output=require_output)
    if src.startswith("hf:"):
        return load_hub_dataset(src[3:], split=split or "train", skip_bad=skip_bad)
    path = Path(src)
    if path.is_dir():
        files = sorted([*path.glob("*.jsonl"), *path.glob("*.json")])
        if not files:
            raise DataError([Problem(str(path), None, None, "folder holds no .jsonl or .json files")])
        results = [load_file(f, skip_bad=skip_bad, require_output=require_output) for f in files]
        examples = [e for r in results for e in r.examples]
        skipped = [p for r in results for p in r.skipped]
        return LoadResult(examples, skipped, str(path))
    if not path.exists():
        raise DataError([Problem(src, None, None,
                                 f"is neither a file, a folder, a bundled benchmark ({', '.join(BENCHMARKS)}) "
                                 "nor hf:NAME")])
    return load_file(path, skip_bad=skip_bad, require_output=require_output)


def load_hub_dataset(spec: str, *, split: str = "train", skip_bad: bool = False) -> LoadResult:
    """Load a `datasets` hub dataset with instruction/input/output or messages columns."""
    name, _, sp = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=sp or split)
    except Exception as e:  # offline, unknown name, ...
        raise DataError([Problem(f"hf:{name}", None, None, f"could not be loaded from the hub ({type(e).__name__}: {e})")]) from None
    examples, problems = [], []
    for i, row in enumerate(ds, start=1):
        ex, probs = parse_row(dict(row), f"hf:{name}", i)
        problems.extend(probs)
        if ex is not None:
            examples.append(ex)
    if problems and not skip_bad:
        raise DataError(problems)
    return LoadResult(examples, problems, f"hf:{name}")
