"""``lmdistill capture --student S``: a teacher with another tokenizer scored once over a dataset, for
``teacher: xtok:cache:DIR`` (the layout: ``cross_cache.py``).

The rows are the ones training will see: the *student's* tokenizer, template (``auto`` resolved from the student's
tokenizer, as a cross-tokenizer run resolves it), length limits and prompt filter; each row is read by the teacher as
a cross-tokenizer run reads it (``cross_rows.Tokenizers``: its own template and tokens), and the teacher's tokens of
the response, their byte ends, its top-k and its own tokens' log-probabilities are stored. Shards are written
atomically and listed in the manifest (size, SHA-256) after each one; rerunning the same command keeps every shard
that matches its entry and scores only the others (after a kill, or a damaged shard).
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lmdistill.data import load_examples, tokenize_examples
from lmdistill.data.templates import resolve_template
from lmdistill.errors import ConfigError
from lmdistill.io import atomic_dir, atomic_open, write_json
from lmdistill.losses.sparse import top_k_teacher
from lmdistill.models import load_model, load_tokenizer
from lmdistill.teachers.capture import CaptureSettings
from lmdistill.teachers.cross_cache import FORMAT, MANIFEST, SPEC_FIELDS, TOKENIZER_DIR, read_manifest, shard_name
from lmdistill.teachers.cross_rows import Tokenizers, model_logits
from lmdistill.teachers.fingerprint import examples_hash, model_fingerprint, row_key, tokenizer_hash
from lmdistill.teachers.shards import entry_problem, shard_entry


def score_shard(model, tokenizers: Tokenizers, rows, s: CaptureSettings, vocab: int) -> dict[str, np.ndarray]:
    """The arrays of one shard (``cross_cache.ARRAYS``) for ``rows``."""
    keys, lengths, ids, ends, top_ids, top_lps, rest, own = [], [], [], [], [], [], [], []
    pad = tokenizers.teacher.pad_token_id if tokenizers.teacher.pad_token_id is not None else 0
    for j in range(0, len(rows), s.batch_size):
        batch = rows[j:j + s.batch_size]
        trows = [tokenizers.row(r) for r in batch]
        keys += [row_key(r.input_ids, r.loss_mask) for r in batch]
        lengths += [len(t.response_ids) for t in trows]
        if not any(t.response_ids for t in trows):
            continue
        logits = model_logits(model, trows, pad)[:, :vocab].float()
        sparse = top_k_teacher(logits, s.top_k, s.temperature)
        flat = torch.tensor([t for r in trows for t in r.response_ids], device=logits.device)
        own.append(torch.log_softmax(logits / s.temperature, -1).gather(-1, flat[:, None])[:, 0].cpu())
        top_ids.append(sparse.ids.cpu())
        top_lps.append(sparse.logprobs.cpu())
        rest.append(sparse.rest.cpu())
        ids += [t for r in trows for t in r.response_ids]
        ends += [e for r in trows for e in r.ends]
    k = min(s.top_k, vocab)
    cat = (lambda xs, shape: torch.cat(xs).numpy() if xs else np.zeros(shape, np.float32))   # noqa: E731
    return {"keys": np.array(keys), "lengths": np.array(lengths, dtype=np.int64),
            "ids": np.array(ids, dtype=np.int64), "ends": np.array(ends, dtype=np.int64),
            "top_ids": cat(top_ids, (0, k)).astype(np.int32 if vocab < 2 ** 31 else np.int64),
            "top_lps": cat(top_lps, (0, k)).astype(s.logprob_dtype), "rest": cat(rest, (0,)).astype(np.float32),
            "own": cat(own, (0,)).astype(np.float32)}


def write_shard(path: Path, arrays: dict[str, np.ndarray], first_row: int, ids: tuple[str, str]) -> dict:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    with atomic_open(path, "wb") as f:
        f.write(data)
    return shard_entry(path.name, data, first_row, len(arrays["keys"]), ids)


def kept_entry(path: Path, entry: dict | None) -> dict | None:
    """``entry`` when the shard at ``path`` is whole and matches it (else it is scored again)."""
    if entry is None or not path.exists():
        return None
    try:
        return None if entry_problem(path.read_bytes(), entry) else entry
    except OSError:
        return None


def capture_aligned(s: CaptureSettings, student: str, teacher_template: str = "auto") -> dict:
    """Capture (or finish, or repair) the cross-tokenizer cache ``s.out`` of teacher ``s.teacher`` for the student
    tokenizer ``student``; returns the final manifest."""
    s.check()
    out = Path(s.out)
    stok, ttok = load_tokenizer(student), load_tokenizer(s.teacher)
    template, note = resolve_template(s.template, {"student": stok}, override="--template ")
    if note:
        print(f"[lmdistill] {note}")
    s = replace(s, template=template)
    tokenizers = Tokenizers(stok, ttok, teacher_template)
    examples = load_examples(s.data).examples[: s.limit or None]
    rows, reports = tokenize_examples(examples, stok, template=s.template, max_prompt_length=s.max_prompt_length,
                                      max_length=s.max_length)
    if not rows:
        raise ConfigError(f"--data {s.data}: no rows left after filtering ({'; '.join(map(str, reports))})")
    model = load_model(s.teacher, dtype=s.dtype, device=s.device)
    vocab = min(model.get_output_embeddings().weight.shape[0], len(ttok))
    spec = {"teacher": s.teacher, "teacher_fingerprint": model_fingerprint(s.teacher), "student": student,
            "tokenizer_hash": tokenizer_hash(stok), "template": s.template, "teacher_template": tokenizers.template,
            "max_prompt_length": s.max_prompt_length, "max_length": s.max_length, "top_k": min(s.top_k, vocab),
            "temperature": float(s.temperature), "data": s.data, "data_hash": examples_hash(examples),
            "logprob_dtype": s.logprob_dtype, "shard_rows": s.shard_rows, "vocab": vocab, "limit": s.limit}
    old = read_manifest(out) if (out / MANIFEST).exists() else None
    if old is None and out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not a cross-tokenizer cache; choose a new folder")
    bad = [f"{k}: cache {old.get(k)!r}, here {spec[k]!r}" for k in SPEC_FIELDS if old and old.get(k) != spec[k]]
    if bad:
        raise ConfigError(f"--out {out}: holds a capture of other settings ({'; '.join(bad)}); use a new folder")
    n_shards = -(-len(rows) // s.shard_rows)
    entries = list((old or {}).get("shard_files") or [])[:n_shards]
    entries += [None] * (n_shards - len(entries))
    head = {"format": FORMAT, **spec, "shards": n_shards, "rows": len(rows), "batch_size": s.batch_size,
            "dtype": s.dtype}
    out.mkdir(parents=True, exist_ok=True)
    if not (out / TOKENIZER_DIR).is_dir():
        with atomic_dir(out / TOKENIZER_DIR) as tmp:
            ttok.save_pretrained(str(tmp))
    write_json(out / MANIFEST, {**head, "complete": False, "shard_files": entries})
    reused = 0
    for i in tqdm(range(n_shards), desc="capture", unit="shard", disable=not s.progress, dynamic_ncols=True):
        part = rows[i * s.shard_rows:(i + 1) * s.shard_rows]
        kept = kept_entry(out / shard_name(i), entries[i])
        if kept is not None:
            reused += 1
            continue
        arrays = score_shard(model, tokenizers, part, s, vocab)
        entries[i] = write_shard(out / shard_name(i), arrays, i * s.shard_rows, (part[0].id, part[-1].id))
        write_json(out / MANIFEST, {**head, "complete": False, "shard_files": entries})
    tokens = sum(len(r.response_ids) for r in rows)
    size = sum(e["size"] for e in entries)
    manifest = {**head, "complete": True, "shard_files": entries, "tokens": tokens, "bytes": size,
                "bytes_per_token": size / max(tokens, 1), "shards_reused": reused,
                "filters": [str(r) for r in reports]}
    write_json(out / MANIFEST, manifest)
    print(f"[lmdistill] captured {len(rows)} rows for the student tokenizer of {student}, teacher top-{spec['top_k']}"
          f": {size / 1e6:.2f} MB ({reused} of {n_shards} shards kept) -> {out}")
    return manifest
