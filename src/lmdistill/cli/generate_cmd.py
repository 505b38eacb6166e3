"""``lmdistill generate``: offline generation with any policy to a resumable JSONL file.

One JSON line per example: ``id``, ``prompt``, ``response`` (text), ``response_ids``, ``sources``
(0 student, 1 teacher/gold, 2 corrected), ``stats``. Each line is fsynced as it is written. Each line is also a
training row (``instruction``/``input`` or ``messages``, and ``output`` = the response), so the file can be the
``data`` of ``lmdistill train`` and ``lmdistill capture`` (SeqKD on stored teacher samples).

Resuming: rerun with the same ``--out`` and settings; ids already in the file are skipped. Every
example draws its noise from ``(seed, id)`` and batches are always the same consecutive chunks of
the example list, so a resumed run (after Ctrl-C or kill -9) writes exactly the bytes an
uninterrupted run would. The settings are stored beside the output (``FILE.jsonl.meta.json``);
resuming with different settings is refused rather than mixing two runs in one file.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from lmdistill.cli import COMMANDS, add_limit
from lmdistill.data import load_examples, tokenize_examples
from lmdistill.data.templates import TEMPLATE_CHOICES, resolve_template
from lmdistill.errors import ConfigError
from lmdistill.generation import NEEDS_TEACHER, POLICIES, SCORES_SEQUENCES, SamplingConfig, generate, key_from, \
    scores_sequences
from lmdistill.io import JsonlAppender, read_jsonl, truncate_torn_tail, write_json
from lmdistill.models import load_model, load_tokenizer
from lmdistill.teachers.served import ServedTeacher
from lmdistill.teachers.spec import SERVED, teacher_kind


def register(sub) -> None:
    p = sub.add_parser("generate", help=COMMANDS["generate"],
                       description="Generate one response per example to a JSONL file; rerun to resume.")
    p.add_argument("--policy", required=True, choices=list(POLICIES),
                   help="who writes the responses (generation/policies: student, teacher, mixed, switch, scrg, "
                        "teacher_mix)")
    p.add_argument("--student", required=True, help="student model folder or hub id (its tokenizer is used)")
    p.add_argument("--teacher", default=None,
                   help="teacher model (needed by teacher, switch, scrg, teacher_mix; by mixed for rows without gold); "
                        "scrg also takes a served teacher, openai:NAME@URL (completions API log-probabilities)")
    p.add_argument("--teacher-top-k", type=int, default=20,
                   help="served teacher: log-probabilities per position (vLLM's default --max-logprobs is 20)")
    p.add_argument("--teacher-logprobs-api", default="echo", choices=["echo", "prompt_logprobs"],
                   help="served teacher: echo + logprobs (OpenAI completions, lmdistill serve) or vLLM's prompt_logprobs")
    p.add_argument("--data", required=True,
                   help="bundled benchmark (dolly, dolly:train, ...) or a JSONL/JSON file/folder")
    p.add_argument("--split", default=None, help="split of a bundled benchmark (default: its default split)")
    p.add_argument("--out", required=True, help="output .jsonl (appended to; existing ids are skipped)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (each example draws from seed and its id)")
    d = SamplingConfig()   # one default per knob: the sampling config's
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="longest response in tokens")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass (1 = off)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=d.no_repeat_ngram_size,
                   help="never repeat an n-gram of prompt + response (0 = off; the eval protocol uses 6)")
    p.add_argument("--batch-size", type=int, default=8, help="examples generated together")
    add_limit(p, "examples", note=" (counted before the prompt filter)")
    p.add_argument("--switch-tau0", "--tau0", dest="switch_tau0", type=float, default=d.switch_tau0,
                   help="switch: JSD threshold at step 0 (inf = never switch)")
    p.add_argument("--switch-decay", "--lam", dest="switch_decay", type=float, default=d.switch_decay,
                   help="switch: threshold decay, tau_t = switch_tau0 * exp(-switch_decay * t)")
    p.add_argument("--mixed-student-prob", "--mix-lambda", dest="mixed_student_prob", type=float,
                   default=d.mixed_student_prob, help="mixed (GKD's lambda): probability of the student's sample")
    p.add_argument("--scrg-rounds", "--n-corrections", dest="scrg_rounds", type=int, default=d.scrg_rounds,
                   help="scrg: correction rounds")
    p.add_argument("--teacher-mix-alpha", "--mix-alpha", dest="teacher_mix_alpha", type=float,
                   default=d.teacher_mix_alpha, help="teacher_mix (MiniLLM): teacher share of the mixture")
    p.add_argument("--template", default="auto", choices=TEMPLATE_CHOICES,
                   help="prompt template; auto: chat when the student's and a local teacher's tokenizers have a "
                        "chat template, else alpaca (said once, recorded in OUT.meta.json)")
    p.add_argument("--max-prompt-length", type=int, default=256, help="longer prompts are dropped (MiniLLM filter)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16")
    p.add_argument("--decoder", default=d.decoder, choices=["auto", "fast", "hf"],
                   help="fast: Llama-family forward with a preallocated cache; hf: model(...) (any model); "
                        "auto: fast where supported")
    p.set_defaults(func=cmd_generate)


#: The SamplingConfig knobs the command line sets (the seed and greedy decoding come from --seed, --temperature 0).
SAMPLING_KNOBS = ("max_new_tokens", "temperature", "top_k", "top_p", "no_repeat_ngram_size", "mixed_student_prob",
                  "switch_tau0", "switch_decay", "scrg_rounds", "teacher_mix_alpha", "decoder")


def _settings(args) -> dict:
    keys = ("policy", "student", "teacher", "data", "split", "seed", *SAMPLING_KNOBS, "batch_size", "limit",
            "template", "max_prompt_length", "dtype")
    s = {k: getattr(args, k) for k in keys}
    s["switch_tau0"] = repr(float(s["switch_tau0"]))  # inf is not JSON
    s["limit"] = s["limit"] or None   # all examples: recorded as before 0 meant all, so older outputs still resume
    if not s["no_repeat_ngram_size"]:  # off: recorded as before the knob existed, so older outputs still resume
        del s["no_repeat_ngram_size"]
    if args.teacher and teacher_kind(args.teacher) == SERVED:
        s["teacher_top_k"], s["teacher_logprobs_api"] = args.teacher_top_k, args.teacher_logprobs_api
    return s


def _check_resume(out: Path, meta: Path, settings: dict) -> None:
    if not meta.exists():
        if out.exists() and out.stat().st_size > 0:
            raise ConfigError(f"{out} exists but has no {meta.name}: it was not written by `lmdistill generate`; "
                              "choose another --out")
        return
    old = json.loads(meta.read_text(encoding="utf-8"))
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
        raise ConfigError(f"{out} was generated with other settings ({shown}); use a new --out or the same flags")


def _done_ids(out: Path) -> set[str]:
    if not out.exists():
        return set()
    truncate_torn_tail(out)
    return {str(row["id"]) for row in read_jsonl(out)}


def _round(x):
    if isinstance(x, float):
        return x if not math.isfinite(x) else round(x, 6)
    if isinstance(x, list):
        return [_round(v) for v in x]
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    return x


def cmd_generate(args) -> int:
    from tqdm import tqdm

    if args.policy in NEEDS_TEACHER and not args.teacher:
        raise ConfigError(f"--policy {args.policy} needs --teacher")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_prompt_length < 1:
        raise ConfigError(f"--max-prompt-length must be >= 1, got {args.max_prompt_length}")
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a .jsonl file path")
    meta = out.with_name(out.name + ".meta.json")
    base = {**{k: getattr(args, k) for k in SAMPLING_KNOBS}, "seed": args.seed, "do_sample": args.temperature > 0}
    SamplingConfig(**base)  # reject bad values before loading anything
    tok = load_tokenizer(args.student)
    args.template = _template(args, tok)   # the resolved one: recorded, and compared on resume
    settings = _settings(args)
    _check_resume(out, meta, settings)

    examples = load_examples(args.data, split=args.split, require_output=False).examples
    examples = examples[:args.limit or None]
    rows, reports = tokenize_examples(examples, tok, template=args.template, max_prompt_length=args.max_prompt_length,
                                      max_length=args.max_prompt_length + args.max_new_tokens)
    for r in reports:
        if r.removed:
            print(f"note: {r}", file=sys.stderr)
    student = load_model(args.student, dtype=args.dtype, device=args.device)
    needs_teacher = args.policy in NEEDS_TEACHER or (args.policy == "mixed" and args.mixed_student_prob < 1
                                                     and any(not x.example.output.strip() for x in rows))
    if needs_teacher and not args.teacher:
        raise ConfigError("--policy mixed needs --teacher for examples without a gold output")
    teacher = _teacher(args)
    vocabs = [m.get_output_embeddings().weight.shape[0] for m in (student, teacher)
              if m is not None and not scores_sequences(m)]
    config = SamplingConfig(**base, vocab_size=len(tok) if len(tok) <= min(vocabs) else None)

    if not meta.exists():
        write_json(meta, settings)
    done = _done_ids(out)
    bar = tqdm(total=len(rows), initial=sum(1 for r in rows if r.id in done), unit="ex",
               desc=f"generate {args.policy}", file=sys.stderr)
    with JsonlAppender(out) as sink:
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start:start + args.batch_size]  # fixed chunks: a resumed batch is computed as before
            if all(r.id in done for r in chunk):
                continue
            gold = [r.response_ids if r.example.output.strip() else None for r in chunk]
            result = generate(student, [r.prompt_ids for r in chunk], args.policy, teacher=teacher, gold=gold,
                              config=config, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                              row_keys=[key_from(args.seed, r.id) for r in chunk])
            for i, r in enumerate(chunk):
                if r.id in done:
                    continue
                ids = result.responses[i]
                text = tok.decode(ids, skip_special_tokens=True)
                sink.append({
                    "id": r.id,
                    **_as_data(r.example, text),
                    "prompt": tok.decode(r.prompt_ids),
                    "response": text,
                    "response_ids": ids,
                    "sources": result.sources[i, :len(ids)].tolist(),
                    "stats": _round(result.stats[i]),
                })
                done.add(r.id)
                bar.update(1)
    bar.close()
    print(f"wrote {out} ({len(done)} of {len(rows)} examples)", file=sys.stderr)
    return 0


def _template(args, student_tokenizer) -> str:
    """``--template`` resolved (``auto``: from the student's and a local teacher's tokenizers; a served teacher
    shares the student's), said once when it was ``auto``."""
    teacher = load_tokenizer(args.teacher) if args.teacher and teacher_kind(args.teacher) != SERVED else None
    template, note = resolve_template(args.template, {"student": student_tokenizer, "teacher": teacher},
                                      override="--template ")
    if note:
        print(f"[lmdistill] {note}", file=sys.stderr)
    return template


def _teacher(args):
    """The ``--teacher``: a model loaded here, or a served one (``openai:NAME@URL``, SCRG only)."""
    if not args.teacher:
        return None
    if teacher_kind(args.teacher) == SERVED:
        if args.policy not in SCORES_SEQUENCES:
            raise ConfigError(f"--policy {args.policy} needs the teacher at every generated token, so a local --teacher; "
                              f"a served one serves {', '.join(SCORES_SEQUENCES)}")
        return ServedTeacher.from_spec(args.teacher, top_k=args.teacher_top_k, api=args.teacher_logprobs_api)
    return load_model(args.teacher, dtype=args.dtype, device=args.device)


def _as_data(example, response: str) -> dict:
    """The fields that make a generated line a training row whose gold response is the generated one."""
    if example.messages:
        return {"messages": [*example.messages, {"role": "assistant", "content": response}]}
    return {"instruction": example.instruction, "input": example.input, "output": response}
