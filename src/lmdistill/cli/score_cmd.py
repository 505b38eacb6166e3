"""``lmdistill score``: ROUGE-L of existing generations against references, matched by id."""

from __future__ import annotations

import json

from lmdistill.cli import COMMANDS
from lmdistill.evaluate.scoring import score_files
from lmdistill.io import write_jsonl


def register(sub) -> None:
    p = sub.add_parser("score", help=COMMANDS["score"],
                       description="Prints a JSON object with rougeL (x100, max over references, mean over "
                                   "examples) and n, the number of examples scored.")
    p.add_argument("--predictions", required=True, metavar="P.jsonl", help="JSONL rows with id and output")
    p.add_argument("--references", required=True, metavar="R.jsonl|NAME",
                   help="JSONL rows with id and references (list) or output, or a bundled benchmark name "
                        "(dolly, selfinst, vicuna, sni, unni; name:split for another split)")
    p.add_argument("--allow-missing", action="store_true",
                   help="score only the predicted ids when some references have no prediction "
                        "(e.g. prompts dropped by the length filter)")
    p.add_argument("--per-example", metavar="OUT.jsonl", default=None, help="also write id and rougeL per example")
    p.set_defaults(func=cmd_score)


def cmd_score(args) -> int:
    result = score_files(args.predictions, args.references, allow_missing=args.allow_missing)
    if args.per_example:
        write_jsonl(args.per_example, ({"id": i, "rougeL": s} for i, s in result.scores.items()))
    print(json.dumps(result.summary(), ensure_ascii=False))
    return 0
