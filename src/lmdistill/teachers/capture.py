"""``lmdistill capture``: run a teacher once over a dataset and keep its top-k log-probabilities (``cache.py``).

The rows are the ones training will see: the same tokenizer, template, length limits and prompt filter
(``tokenize_examples``), in data order, cut to ``limit``. Row ``i`` goes to shard ``i // shard_rows``; each shard is
written atomically once its rows are scored. A rerun into the same folder checks that everything it was captured
from is the same (else it refuses, naming what differs), keeps every shard that is whole and scores only the
missing ones: after a kill -9 no row is lost and none is scored or stored twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmdistill.data import load_examples, tokenize_examples
from lmdistill.data.collate import collate_for_training
from lmdistill.errors import ConfigError
from lmdistill.losses.model_forward import selected_logits
from lmdistill.losses.sparse import top_k_teacher
from lmdistill.models import load_model, load_tokenizer
from lmdistill.teachers.cache import (SPEC_FIELDS, mismatches, read_manifest, shard_path, write_manifest,
                                      write_shard)
from lmdistill.teachers.fingerprint import examples_hash, model_fingerprint, row_key, tokenizer_hash

LOGPROB_DTYPES = ("float16", "float32")


@dataclass
class CaptureSettings:
    teacher: str
    data: str
    out: str
    top_k: int = 64
    limit: int = 0                 # 0 = every row
    template: str = "alpaca"
    max_prompt_length: int = 256
    max_length: int = 512
    temperature: float = 1.0
    logprob_dtype: str = "float16"
    shard_rows: int = 64
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"
    progress: bool = True

    def check(self) -> "CaptureSettings":
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"--top-k must be a positive integer, got {self.top_k!r}")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise ConfigError(f"--logprob-dtype must be one of {', '.join(LOGPROB_DTYPES)}, got {self.logprob_dtype!r}")
        for name in ("shard_rows", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.limit < 0:
            raise ConfigError(f"--limit must be >= 0, got {self.limit}")
        if not (self.temperature > 0 and self.temperature < float("inf")):
            raise ConfigError(f"--temperature must be a positive finite number, got {self.temperature}")
        return self


def cache_spec(tokenizer, teacher_fp: str, examples, s: CaptureSettings, vocab: int) -> dict:
    """The manifest fields a reader or a resumed capture must agree with."""
    return {"teacher": s.teacher, "teacher_fingerprint": teacher_fp, "tokenizer_hash": tokenizer_hash(tokenizer),
            "template": s.template, "max_prompt_length": s.max_prompt_length, "max_length": s.max_length,
            "top_k": min(s.top_k, vocab), "temperature": float(s.temperature), "data": s.data,
            "data_hash": examples_hash(examples), "logprob_dtype": s.logprob_dtype, "shard_rows": s.shard_rows,
            "vocab": vocab, "limit": s.limit}


def model_vocab(model, tokenizer) -> int:
    """The vocabulary the cached distributions are over: the tokenizer's ids (padding rows of the head left out)."""
    return min(model.get_output_embeddings().weight.shape[0], len(tokenizer))


def shard_intact(path: Path, keys: list[str]) -> bool:
    import numpy as np

    try:
        with np.load(path) as z:
            return z["keys"].tolist() == keys
    except Exception:   # unreadable: a partial file of another tool, or damage; it is rewritten
        return False


@torch.no_grad()
def score_rows(model, rows, vocab: int, top_k: int, temperature: float, pad_id: int, device):
    """Top-k sparse teacher of each row (its trained positions), one batched forward."""
    batch = {k: v.to(device) for k, v in collate_for_training(rows, pad_id).items()}
    mask = batch["loss_mask"][:, 1:]
    logits = selected_logits(model, batch, mask)[:, :vocab]
    sparse = top_k_teacher(logits, top_k, temperature)
    counts = mask.sum(-1).tolist()
    out, start = [], 0
    for n in counts:
        out.append(sparse.rows(start, start + n))
        start += n
    return out


def capture(s: CaptureSettings) -> dict:
    """Capture (or finish capturing) the cache ``s.out``; returns the final manifest."""
    s.check()
    out = Path(s.out)
    tokenizer = load_tokenizer(s.teacher)
    loaded = load_examples(s.data)
    examples = loaded.examples[: s.limit or None]
    if not examples:
        raise ConfigError(f"--data {s.data}: no examples")
    rows, reports = tokenize_examples(examples, tokenizer, template=s.template, max_prompt_length=s.max_prompt_length,
                                      max_length=s.max_length)
    for r in reports:
        print(f"[lmdistill] {r}")
    if not rows:
        raise ConfigError(f"--data {s.data}: no rows left after filtering ({'; '.join(map(str, reports))})")
    model = load_model(s.teacher, dtype=s.dtype, device=s.device)
    device = next(model.parameters()).device
    vocab = model_vocab(model, tokenizer)
    spec = cache_spec(tokenizer, model_fingerprint(s.teacher), examples, s, vocab)
    n_shards = -(-len(rows) // s.shard_rows)
    old = read_manifest(out) if out.exists() else None
    if old is not None:
        bad = mismatches(old, spec)
        if bad:
            raise ConfigError(f"--out {out}: holds a capture of other settings ({'; '.join(bad)}); capture into a "
                              "new folder")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not a teacher cache; choose a new folder")
    for stale in out.glob(".shard-*.tmp"):   # a shard being written when the last run was killed
        stale.unlink()
    write_manifest(out, {**spec, "complete": False, "shards": n_shards, "rows": len(rows), "shards_done": 0})

    keys = [row_key(r.input_ids, r.loss_mask) for r in rows]
    total_tokens = sum(len(r.response_ids) for r in rows)
    bar = tqdm(total=total_tokens, unit="tok", desc="capture", disable=not s.progress, dynamic_ncols=True)
    done_bytes = done_tokens = reused = 0
    t0 = time.time()
    for i in range(n_shards):
        shard_rows = rows[i * s.shard_rows:(i + 1) * s.shard_rows]
        shard_keys = keys[i * s.shard_rows:(i + 1) * s.shard_rows]
        path = shard_path(out, i)
        n_tok = sum(len(r.response_ids) for r in shard_rows)
        if path.exists() and shard_intact(path, shard_keys):
            reused += 1
        else:
            parts = []
            for j in range(0, len(shard_rows), s.batch_size):
                parts += score_rows(model, shard_rows[j:j + s.batch_size], vocab, spec["top_k"], s.temperature,
                                    tokenizer.pad_token_id, device)
            write_shard(path, shard_keys, parts, vocab, s.logprob_dtype)
        done_bytes += path.stat().st_size
        done_tokens += n_tok
        bar.update(n_tok)
        bar.set_postfix(bytes_per_token=f"{done_bytes / max(done_tokens, 1):.0f}")
    bar.close()
    manifest = {**spec, "complete": True, "shards": n_shards, "shards_done": n_shards, "rows": len(rows),
                "tokens": total_tokens, "bytes": done_bytes, "bytes_per_token": done_bytes / max(total_tokens, 1),
                "shards_reused": reused, "seconds": round(time.time() - t0, 2),
                "filters": [str(r) for r in reports]}
    write_manifest(out, manifest)
    print(f"[lmdistill] captured {len(rows)} rows, {total_tokens} tokens, top-{spec['top_k']}: "
          f"{done_bytes / 1e6:.2f} MB, {manifest['bytes_per_token']:.1f} bytes/token -> {out}"
          + (f" ({reused} of {n_shards} shards kept from an earlier run)" if reused else ""))
    return manifest


__all__ = ["CaptureSettings", "SPEC_FIELDS", "capture"]
