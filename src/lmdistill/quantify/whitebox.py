"""White-box distillation degree for a local teacher-student pair (beyond the paper).

For each prompt (chat template applied), the response is the teacher's greedy answer (``max_new_tokens``)
or, with ``use_references``, the prompt row's reference (``output``/``reference``/``response`` field).
Both models are run teacher-forced on prompt + response; on the response positions we measure the
token-level KL(teacher || student) at temperature 1 and the top-1 agreement (same argmax). Vocabularies
that differ only by padding rows are compared on their shared prefix. Lower KL and higher agreement mean
the student sits closer to the teacher.

Batched (``batch_size`` prompts at a time, ``--batch-size``): the teacher's greedy answers come from the sequence
engine (``lmdistill.generation.generate``: left-padded batch, the fast decoder for Llama-family models), and
both models score a batch in one teacher-forced forward each (left padding, positions from the attention mask,
logits kept only for the response positions). The tokens and statistics are those of one prompt at a time to
float rounding (a near-tie of the greedy argmax may rarely break the other way). ``batch_size=1`` runs each
prompt alone through the same code.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from lmdistill.data.prompt_prefix import encode_prompt
from lmdistill.errors import ConfigError
from lmdistill.io import iter_jsonl_rows, write_json, write_jsonl, write_text
from lmdistill.losses.divergences import per_token_divergence
from lmdistill.models import load_model, load_tokenizer
from lmdistill.quantify.report import whitebox_markdown
from lmdistill.quantify.rse import load_prompt_set


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"user: {prompt}\nassistant: "
    return encode_prompt(text, tokenizer)   # the tokenizer's <bos> first (Gemma), once


def _cut(resp: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(resp):
        if t in eos_ids:
            return resp[:i + 1]
    return resp


def _stop_ids(model, tokenizer) -> set[int]:
    """Where a greedy answer ends: the tokenizer's EOS (and ``<|end|>``) and the generation config's EOS ids."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if "<|end|>" in tokenizer.get_vocab():
        eos.add(tokenizer.convert_tokens_to_ids("<|end|>"))
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return eos


def _greedy_many(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int], pad_id: int) -> list[list[int]]:
    """The greedy answer to each prompt (through its first stop token), decoded as one batch."""
    from lmdistill.generation import SamplingConfig, generate

    eos = min(eos_ids) if eos_ids else None  # the batch stops a row at this one; _cut ends it at any stop id
    out = generate(model, prompts, policy="student", config=SamplingConfig(max_new_tokens=max_new_tokens,
                   do_sample=False, temperature=0.0), pad_id=pad_id, eos_id=eos)
    return [_cut(list(r), eos_ids) for r in out.responses]


@torch.inference_mode()
def compare_on(teacher, student, ids: list[int], n_prompt: int) -> dict:
    """Teacher-forced KL(teacher||student) and top-1 agreement on positions predicting ids[n_prompt:]."""
    x = torch.tensor([ids], device=teacher.device)
    t_logits = teacher(input_ids=x).logits[0].float()
    s_logits = student(input_ids=x.to(student.device)).logits[0].float().to(t_logits.device)
    vocab = min(t_logits.shape[-1], s_logits.shape[-1])
    sl = slice(n_prompt - 1, len(ids) - 1)  # logits at t predict token t+1
    t, s = t_logits[sl, :vocab], s_logits[sl, :vocab]
    kl = per_token_divergence("fkl", s, t)   # KL(teacher || student), the training losses' own formula
    agree = (t.argmax(-1) == s.argmax(-1)).float()
    return {"tokens": int(kl.numel()), "kl_sum": float(kl.sum()), "agree_sum": float(agree.sum())}


@torch.inference_mode()
def compare_many(teacher, student, seqs: list[tuple[list[int], int]]) -> list[dict]:
    """``compare_on`` of each ``(ids, n_prompt)``, both models run once on the left-padded batch."""
    width = max(len(ids) for ids, _ in seqs)
    keep = max(len(ids) - n for ids, n in seqs) + 1  # the last positions: every response's predicting logits
    x = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, (ids, _) in enumerate(seqs):
        x[b, width - len(ids):] = torch.tensor(ids)
        mask[b, width - len(ids):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    def logits(model):
        d = model.device
        return model(input_ids=x.to(d), attention_mask=mask.to(d), position_ids=pos.to(d),
                     logits_to_keep=keep).logits[:, -keep:].float()

    t_all = logits(teacher)
    s_all = logits(student).to(t_all.device)
    vocab = min(t_all.shape[-1], s_all.shape[-1])
    out = []
    for b, (ids, n_prompt) in enumerate(seqs):
        n = len(ids) - n_prompt  # response tokens, predicted by the n positions before the last one
        t, s = t_all[b, keep - 1 - n:keep - 1, :vocab], s_all[b, keep - 1 - n:keep - 1, :vocab]
        kl = per_token_divergence("fkl", s, t)
        agree = (t.argmax(-1) == s.argmax(-1)).float()
        out.append({"tokens": int(kl.numel()), "kl_sum": float(kl.sum()), "agree_sum": float(agree.sum())})
    return out


def run_whitebox(teacher_path: str, student_path: str, items: list[dict], *, max_new_tokens: int = 128,
                 use_references: bool = False, device: str | None = None, progress: bool = True,
                 batch_size: int = 8) -> dict:
    from tqdm import tqdm

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    teacher = load_model(teacher_path, device=device)
    student = load_model(student_path, device=device)
    tokenizer = load_tokenizer(teacher_path)
    eos = _stop_ids(teacher, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    max_pos = min(getattr(m.config, "max_position_embeddings", 10**9) for m in (teacher, student))
    prompts = [_prompt_ids(tokenizer, it["prompt"])[-(max_pos - max_new_tokens - 1):] for it in items]
    rows = []
    bar = tqdm(total=len(items), desc="white-box", disable=not progress, leave=False)
    for start in range(0, len(items), batch_size):
        part = list(range(start, min(start + batch_size, len(items))))
        if use_references:
            responses = []
            for i in part:
                ref = items[i].get("reference")
                if not isinstance(ref, str) or not ref:
                    raise ConfigError(f"prompt {items[i]['id']}: --use-references needs an output/reference/response "
                                      "field")
                responses.append(tokenizer(ref, add_special_tokens=False)["input_ids"][:max_new_tokens])
        else:
            responses = _greedy_many(teacher, [prompts[i] for i in part], max_new_tokens, eos, pad)
        kept = [(i, r) for i, r in zip(part, responses) if r]
        if kept:
            stats = compare_many(teacher, student, [(prompts[i] + r, len(prompts[i])) for i, r in kept])
            for (i, _), st in zip(kept, stats):
                rows.append({"id": items[i]["id"], **st, "kl_mean": st["kl_sum"] / st["tokens"],
                             "top1_agreement": st["agree_sum"] / st["tokens"]})
        bar.update(len(part))
    bar.close()
    tokens = sum(r["tokens"] for r in rows)
    if not tokens:
        raise ConfigError("no response tokens to compare (empty prompt set or empty responses)")
    return {"kind": "whitebox", "teacher": str(teacher_path), "student": str(student_path), "prompts": len(rows),
            "tokens": tokens, "responses": "references" if use_references else f"teacher greedy, <= {max_new_tokens} tokens",
            "kl_mean": round(sum(r["kl_sum"] for r in rows) / tokens, 6),
            "top1_agreement": round(sum(r["agree_sum"] for r in rows) / tokens, 6),
            "kl_per_prompt_mean": round(statistics.fmean(r["kl_mean"] for r in rows), 6),
            "items": rows}


def load_whitebox_items(spec: str, limit: int | None = None) -> list[dict]:
    """Prompts like RSE's ``--prompts``; a JSONL row's output/reference/response becomes ``reference``."""
    _, items = load_prompt_set(spec, limit)
    path = Path(spec)
    if path.suffix in (".jsonl", ".json") and path.is_file():
        rows = [row for _, row, _ in iter_jsonl_rows(path)]   # the lines load_prompt_set read (and checked)
        for it, row in zip(items, rows):
            ref = next((row[k] for k in ("output", "reference", "response") if isinstance(row.get(k), str)), None)
            it["reference"] = ref
    return items


def write_whitebox(result: dict, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "items"}
    write_json(out / "whitebox.json", summary)
    write_jsonl(out / "whitebox_items.jsonl", result["items"])
    write_text(out / "whitebox.md", whitebox_markdown([summary]))
    return summary
