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

import dataclasses
import json
import math
import sys
import typing
from pathlib import Path

from lmdistill.cli import COMMANDS, add_limit
from lmdistill.data import load_examples, tokenize_examples
from lmdistill.data.templates import TEMPLATE_CHOICES, resolve_template
from lmdistill.errors import ConfigError
from lmdistill.generation import POLICIES, SamplingConfig, generate, key_from
from lmdistill.io import JsonlAppender, read_jsonl, truncate_torn_tail, write_json
from lmdistill.models import load_model, load_tokenizer
from lmdistill.teachers import LOCAL, SERVED, check_spec, open_teacher, teacher_kind
from lmdistill.train.needs import policy_need
from lmdistill.train.sequences import engine_arguments


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
    add_policy_flags(p)
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
SAMPLING_KNOBS = ("max_new_tokens", "temperature", "top_k", "top_p", "no_repeat_ngram_size", "decoder")
#: Policy flags recorded in every meta file before issue 31 (the rest are recorded only when not at their default,
#: so an older output file still resumes).
RECORDED_BEFORE = ("mixed_student_prob", "switch_tau0", "switch_decay", "scrg_rounds", "teacher_mix_alpha")


def add_policy_flags(p) -> None:
    """One flag per parameter of every generation policy (``--switch-tau0``, ``--scrg-rounds``, ...), made from its
    ``Params`` (default and help from the dataclass), plus the old spellings each policy lists as aliases."""
    for policy in POLICIES.values():
        hints = typing.get_type_hints(policy.Params)
        for f in dataclasses.fields(policy.Params):
            kind = hints[f.name] if hints[f.name] in (int, float) else str
            p.add_argument(policy.flag(f.name), *policy.aliases.get(f.name, []), dest=f"{policy.name}_{f.name}",
                           type=kind, default=f.default, help=f"{policy.name}: {f.metadata.get('help', f.name)}")


def policy_values(args) -> dict:
    """The chosen policy's parameters from its flags; a flag of another policy set away from its default is refused."""
    chosen = {}
    for policy in POLICIES.values():
        for f in dataclasses.fields(policy.Params):
            value = getattr(args, f"{policy.name}_{f.name}")
            if policy.name == args.policy:
                chosen[f.name] = value
            elif value != f.default:
                raise ConfigError(f"{policy.flag(f.name)} is a parameter of --policy {policy.name}, not of "
                                  f"--policy {args.policy}")
    return chosen


def _settings(args) -> dict:
    keys = ("policy", "student", "teacher", "data", "split", "seed", *SAMPLING_KNOBS, "batch_size", "limit",
            "template", "max_prompt_length", "dtype")
    s = {k: getattr(args, k) for k in keys}
    for policy in POLICIES.values():
        for f in dataclasses.fields(policy.Params):
            key, value = f"{policy.name}_{f.name}", getattr(args, f"{policy.name}_{f.name}")
            if key in RECORDED_BEFORE or value != f.default:
                s[key] = repr(float(value)) if isinstance(value, float) and math.isinf(value) else value
    s["switch_tau0"] = repr(float(s["switch_tau0"]))  # inf is not JSON; recorded as text as before
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

    params = POLICIES[args.policy].params(policy_values(args), where=f"--policy {args.policy}")
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
    needs = policy_need(args.policy, POLICIES[args.policy].teacher_needs(params, all_gold=False),
                        SamplingConfig(**base).divergence_temperature)
    if needs and not args.teacher:
        raise ConfigError(f"--policy {args.policy} needs --teacher"
                          + (" (for examples without a gold output)" if args.policy == "mixed" else ""))
    if args.teacher:
        check_spec(args.teacher, needs, where=f"--teacher {args.teacher}")
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
    teacher = open_teacher(args.teacher, needs, where=f"--teacher {args.teacher}", device=args.device,
                           dtype=args.dtype, top_k=args.teacher_top_k, api=args.teacher_logprobs_api)
    vocabs = [m.get_output_embeddings().weight.shape[0] for m in (student, teacher and teacher.model) if m is not None]
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
            result = generate(student, [r.prompt_ids for r in chunk], args.policy, gold=gold, config=config,
                              params=params, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                              row_keys=[key_from(args.seed, r.id) for r in chunk], **engine_arguments(teacher))
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
    teacher = load_tokenizer(args.teacher) if args.teacher and teacher_kind(args.teacher) == LOCAL else None
    template, note = resolve_template(args.template, {"student": student_tokenizer, "teacher": teacher},
                                      override="--template ")
    if note:
        print(f"[lmdistill] {note}", file=sys.stderr)
    return template


def _as_data(example, response: str) -> dict:
    """The fields that make a generated line a training row whose gold response is the generated one."""
    if example.messages:
        return {"messages": [*example.messages, {"role": "assistant", "content": response}]}
    return {"instruction": example.instruction, "input": example.input, "output": response}
