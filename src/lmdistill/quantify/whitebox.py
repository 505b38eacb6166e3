"""White-box distillation degree for a local teacher-student pair (beyond the paper).

For each prompt (chat template applied), the response is the teacher's greedy answer (``max_new_tokens``)
or, with ``use_references``, the prompt row's reference (``output``/``reference``/``response`` field).
Both models are run teacher-forced on prompt + response; on the response positions we measure the
token-level KL(teacher || student) at temperature 1 and the top-1 agreement (same argmax). Vocabularies
that differ only by padding rows are compared on their shared prefix. Lower KL and higher agreement mean
the student sits closer to the teacher.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from lmdistill.errors import ConfigError
from lmdistill.io import write_json, write_jsonl, write_text
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
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def _greedy(model, ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    out = model.generate(torch.tensor([ids], device=model.device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                         device=model.device), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=next(iter(eos_ids)) if eos_ids else None)
    resp = out[0, len(ids):].tolist()
    for i, t in enumerate(resp):
        if t in eos_ids:
            return resp[:i + 1]
    return resp


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


def run_whitebox(teacher_path: str, student_path: str, items: list[dict], *, max_new_tokens: int = 128,
                 use_references: bool = False, device: str | None = None, progress: bool = True) -> dict:
    from tqdm import tqdm

    teacher = load_model(teacher_path, device=device)
    student = load_model(student_path, device=device)
    tokenizer = load_tokenizer(teacher_path)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if "<|end|>" in tokenizer.get_vocab():
        eos.add(tokenizer.convert_tokens_to_ids("<|end|>"))
    max_pos = min(getattr(m.config, "max_position_embeddings", 10**9) for m in (teacher, student))
    rows = []
    for it in tqdm(items, desc="white-box", disable=not progress, leave=False):
        p_ids = _prompt_ids(tokenizer, it["prompt"])[-(max_pos - max_new_tokens - 1):]
        if use_references:
            ref = it.get("reference")
            if not isinstance(ref, str) or not ref:
                raise ConfigError(f"prompt {it['id']}: --use-references needs an output/reference/response field")
            r_ids = tokenizer(ref, add_special_tokens=False)["input_ids"][:max_new_tokens]
        else:
            r_ids = _greedy(teacher, p_ids, max_new_tokens, eos)
        if not r_ids:
            continue
        stats = compare_on(teacher, student, p_ids + r_ids, len(p_ids))
        rows.append({"id": it["id"], **stats, "kl_mean": stats["kl_sum"] / stats["tokens"],
                     "top1_agreement": stats["agree_sum"] / stats["tokens"]})
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
        rows = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
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
