"""``lmdistill capture``: store a teacher's top-k log-probabilities over a dataset, for ``teacher=cache:DIR``."""

from __future__ import annotations

from lmdistill.cli import COMMANDS, add_limit
from lmdistill.data.templates import TEMPLATE_CHOICES
from lmdistill.teachers.capture import LOGPROB_DTYPES, CaptureSettings, capture
from lmdistill.teachers.cross_capture import capture_aligned
from lmdistill.teachers.cross_rows import TEACHER_TEMPLATES


def register(sub) -> None:
    d = CaptureSettings("", "", "")
    p = sub.add_parser("capture", help=COMMANDS["capture"],
                       description="Score every response token of DATA with the teacher once; train many students "
                                   "from the result with teacher=cache:OUT. Rerun the same command to resume, or "
                                   "to rewrite shards found damaged (each shard's size and SHA-256 are in "
                                   "OUT/manifest.json; only the damaged ones are recomputed).")
    p.add_argument("--teacher", required=True, help="teacher model folder or hub id")
    p.add_argument("--data", required=True, help="bundled benchmark (dolly:train, ...), a JSONL/JSON file, or the "
                                                 "output of `lmdistill generate` (SeqKD on stored samples)")
    p.add_argument("--out", required=True,
                   help="cache folder (created; an unfinished capture there is completed, damaged shards rewritten)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="log-probabilities kept per position")
    add_limit(p, "examples")
    p.add_argument("--template", default=d.template, choices=TEMPLATE_CHOICES,
                   help="as the training recipe's; auto: chat when the teacher's tokenizer has a chat template, "
                        "else alpaca (the manifest records the one chosen)")
    p.add_argument("--max-prompt-length", type=int, default=d.max_prompt_length, help="as the training recipe's")
    p.add_argument("--max-length", type=int, default=d.max_length, help="as the training recipe's")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="distributions are softmax(logits / T); the loss must use the same T")
    p.add_argument("--logprob-dtype", default=d.logprob_dtype, choices=list(LOGPROB_DTYPES),
                   help="storage type of the kept log-probabilities")
    p.add_argument("--shard-rows", type=int, default=d.shard_rows, help="rows per shard (the unit of resume)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows scored per teacher forward")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1 or auto (cuda when available)")
    p.add_argument("--dtype", default=d.dtype, help="teacher dtype (float32, bfloat16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--student", default="",
                   help="a student whose tokenizer differs from the teacher's: the rows are the student's, the teacher "
                        "reads them in its own tokens and template, for teacher=xtok:cache:OUT (uld); --template is "
                        "then the student's")
    p.add_argument("--teacher-template", default="auto", choices=list(TEACHER_TEMPLATES),
                   help="with --student: the teacher's template (auto: its chat template when it has one, else alpaca)")
    p.set_defaults(func=cmd_capture)


def cmd_capture(args) -> int:
    settings = CaptureSettings(teacher=args.teacher, data=args.data, out=args.out, top_k=args.top_k, limit=args.limit,
                               template=args.template, max_prompt_length=args.max_prompt_length,
                               max_length=args.max_length, temperature=args.temperature,
                               logprob_dtype=args.logprob_dtype, shard_rows=args.shard_rows,
                               batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                               progress=not args.no_progress)
    if args.student:   # a teacher with another tokenizer: teacher=xtok:cache:OUT
        capture_aligned(settings, args.student, args.teacher_template)
    else:
        capture(settings)
    return 0
