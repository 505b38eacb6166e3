"""``lmdistill data list|show|check``."""

from __future__ import annotations

import json
import statistics

from lmdistill.cli import COMMANDS
from lmdistill.data import load_examples, tokenize_examples
from lmdistill.data.registry import BENCHMARKS, count_rows
from lmdistill.errors import DataError
from lmdistill.models import build_tokenizer, load_tokenizer


def register(sub) -> None:
    p = sub.add_parser("data", help=COMMANDS["data"])
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    ls = dsub.add_parser("list", help="list bundled benchmarks (name, split, rows, license)")
    ls.set_defaults(func=cmd_list)
    show = dsub.add_parser("show", help="counts, token-length statistics and one example")
    show.add_argument("name", help="bundled name (dolly, dolly:train, ...) or a file/folder")
    show.add_argument("--split", default=None)
    show.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the built-in one)")
    show.add_argument("--template", default="alpaca", choices=["alpaca", "chat"])
    show.add_argument("--max-prompt-length", type=int, default=256)
    show.set_defaults(func=cmd_show)
    check = dsub.add_parser("check", help="validate a JSONL/JSON file or folder; non-zero exit on errors")
    check.add_argument("file")
    check.add_argument("--skip-bad", action="store_true", help="report bad rows as skipped instead of failing")
    check.add_argument("--no-output", action="store_true", help="rows need no output (prompt-only data)")
    check.set_defaults(func=cmd_check)


def cmd_list(args) -> int:
    rows = [("name", "split", "rows", "license", "title")]
    for b in BENCHMARKS.values():
        for split in b.splits:
            rows.append((b.name if split == b.default_split else f"{b.name}:{split}", split,
                         str(count_rows(b.path(split))), b.license, b.title))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _stats(xs: list[int]) -> dict:
    if not xs:
        return {}
    s = sorted(xs)
    return {"min": s[0], "mean": round(statistics.fmean(s), 1), "p50": s[len(s) // 2],
            "p95": s[min(len(s) - 1, int(0.95 * len(s)))], "max": s[-1]}


def cmd_show(args) -> int:
    res = load_examples(args.name, split=args.split)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else build_tokenizer()
    toks, reports = tokenize_examples(res.examples, tok, template=args.template,
                                      max_prompt_length=10**9)
    prompt_lens = [len(t.prompt_ids) for t in toks]
    resp_lens = [len(t.response_ids) for t in toks]
    over = sum(n > args.max_prompt_length for n in prompt_lens)
    out = {
        "source": res.path, "rows": len(res.examples),
        "tokenizer": args.tokenizer or "built-in (byte-level BPE, 4096)",
        "prompt_tokens": _stats(prompt_lens), "response_tokens": _stats(resp_lens),
        f"prompts_over_{args.max_prompt_length}_tokens (dropped by the MiniLLM filter)": over,
        "example": res.examples[0].__dict__ if res.examples else None,
    }
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


def cmd_check(args) -> int:
    try:
        res = load_examples(args.file, skip_bad=args.skip_bad, require_output=not args.no_output)
    except DataError as e:
        for p in e.problems:
            print(p)
        print(f"{len(e.problems)} problem(s) found; fix them or rerun with --skip-bad")
        return 1
    for p in res.skipped:
        print(f"skipped: {p}")
    print(res.report())
    return 0
