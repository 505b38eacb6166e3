"""``lmdistill data list|show|check``."""

from __future__ import annotations

import json
import statistics

from lmdistill.cli import COMMANDS
from lmdistill.data import load_examples
from lmdistill.data.tokenize import CutReport, apply_length_limits, encode_examples
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
    show.add_argument("--split", default=None, help="split of a bundled benchmark (default: its default split)")
    show.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the built-in one)")
    show.add_argument("--template", default="alpaca", choices=["alpaca", "chat"], help="prompt template of the lengths")
    show.add_argument("--max-prompt-length", type=int, default=256,
                      help="prompts longer than this are counted as dropped by the MiniLLM filter")
    show.add_argument("--max-length", type=int, default=512,
                      help="prompt + response + EOS longer than this: the response is cut (reported separately)")
    show.set_defaults(func=cmd_show)
    check = dsub.add_parser("check", help="validate a JSONL/JSON file or folder; non-zero exit on errors")
    check.add_argument("file", help="a JSONL/JSON file or a folder of them")
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
    """Lengths as written (``prompt_tokens``, ``response_tokens``: the data's own, nothing cut) and, labelled as
    such, after the length rules training applies (prompts over ``--max-prompt-length`` dropped, responses cut to
    fit ``--max-length``, EOS added), with the rows each rule removed or cut and the response tokens lost."""
    res = load_examples(args.name, split=args.split)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else build_tokenizer()
    prompts, responses = encode_examples(res.examples, tok, template=args.template)
    rows, reports = apply_length_limits(res.examples, prompts, responses, tok,
                                        max_prompt_length=args.max_prompt_length, max_length=args.max_length)
    cut = next(r for r in reports if isinstance(r, CutReport))
    after = (f"after_length_rules (prompts over {args.max_prompt_length} tokens dropped, responses cut to fit "
             f"max_length {args.max_length} with EOS)")
    out = {
        "source": res.path, "rows": len(res.examples),
        "tokenizer": args.tokenizer or "built-in (byte-level BPE, 4096)",
        "prompt_tokens": _stats([len(p) for p in prompts]), "response_tokens": _stats([len(r) for r in responses]),
        f"prompts_over_{args.max_prompt_length}_tokens (dropped by the MiniLLM filter)": len(res.examples) - len(rows),
        f"responses_cut_at_max_length_{args.max_length}": {
            "rows": cut.cut, "response_tokens_lost": cut.tokens_lost, "of_response_tokens": cut.tokens_total,
            "share_lost": round(cut.share_lost, 6)},
        after: {"rows": len(rows), "prompt_tokens": _stats([len(t.prompt_ids) for t in rows]),
                "response_tokens": _stats([len(t.response_ids) for t in rows])},
        "filters": [str(r) for r in reports],
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
