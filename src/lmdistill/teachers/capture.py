"""``lmdistill capture``: run a teacher once over a dataset and keep its top-k log-probabilities (``cache.py``).

The rows are the ones training will see: the same tokenizer, template, length limits and prompt filter
(``tokenize_examples``), in data order, cut to ``limit``. Row ``i`` goes to shard ``i // shard_rows``; each shard is
written atomically once its rows are scored, then the manifest, atomically, with the shard's size and SHA-256
(``shards.py``). A rerun into the same folder checks that everything it was captured from is the same (else it
refuses, naming what differs), keeps every shard that matches its manifest entry (or, written just before a kill
and not yet listed, decodes whole with the right rows) and scores only the others: after a kill -9 no row is lost
and none is scored or stored twice, and a shard damaged since (truncated, changed, missing) is rewritten, each
said as it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmdistill.data import load_examples, tokenize_examples
from lmdistill.data.collate import collate_for_training
from lmdistill.data.templates import resolve_template
from lmdistill.errors import ConfigError
from lmdistill.losses.model_forward import selected_logits
from lmdistill.losses.sparse import top_k_teacher
from lmdistill.models import load_model, load_tokenizer
from lmdistill.teachers.base import Need
from lmdistill.teachers.open import check_spec
from lmdistill.teachers.cache import (MANIFEST, SPEC_FIELDS, mismatches, read_manifest, read_shard_arrays,
                                      shard_path, write_manifest, write_shard)
from lmdistill.teachers.fingerprint import examples_hash, model_fingerprint, row_key, tokenizer_hash
from lmdistill.teachers.shards import (SHARD_FILES, DamagedCacheError, entry_problem, rows_held, shard_entries,
                                       shard_entry, unreadable)

LOGPROB_DTYPES = ("float16", "float32")
SHARD_ARRAYS = ("keys", "lengths", "ids", "logprobs", "rest")


@dataclass
class CaptureSettings:
    teacher: str
    data: str
    out: str
    top_k: int = 64
    limit: int = 0                 # 0 = every row
    template: str = "auto"         # auto: chat when the teacher's tokenizer has one; the manifest records the choice
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


def shard_status(path: Path, entry: dict | None, keys: list[str], first_row: int,
                 ids: tuple[str, str]) -> tuple[dict | None, str | None]:
    """``(entry, None)`` when the shard at ``path`` can be kept, with its manifest entry (a shard written before its
    entry was, by a run killed in between, or by an lmdistill without checksums, is decoded whole and its keys
    compared); ``(None, why)`` when it must be rewritten because it is damaged; ``(None, None)`` when it is not
    there and never was."""
    if not path.exists():
        return None, ("is missing" if entry else None)
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    if entry is not None:
        return (None, why) if (why := entry_problem(data, entry)) else (entry, None)
    try:
        z = read_shard_arrays(data, SHARD_ARRAYS)
    except ValueError as e:
        return None, unreadable(e)
    if z["keys"].tolist() != keys:
        return None, "holds other rows than this capture's"
    return shard_entry(path.name, data, first_row, len(keys), ids), None


def earlier_entries(old: dict | None, out: Path, n_shards: int) -> list[dict | None]:
    """The shard entries an earlier capture into ``out`` recorded (None where it recorded none)."""
    try:
        entries = shard_entries(old, out, complete=False) if old is not None else None
    except DamagedCacheError:
        print(f"[lmdistill] {out / MANIFEST}: its shard list is damaged; every shard is checked against its rows")
        entries = None
    entries = list(entries or [])[:n_shards]
    return entries + [None] * (n_shards - len(entries))


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


def check_out(out: Path, spec: dict) -> dict | None:
    """The manifest of an earlier capture of the same settings into ``out`` (None for a new folder); another
    capture's folder, or a folder of other files, is refused."""
    old = read_manifest(out) if out.exists() else None
    if old is not None:
        bad = mismatches(old, spec)
        if bad:
            raise ConfigError(f"--out {out}: holds a capture of other settings ({'; '.join(bad)}); capture into a "
                              "new folder")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not a teacher cache; choose a new folder")
    return old


def capture(s: CaptureSettings) -> dict:
    """Capture (or finish capturing, or repair) the cache ``s.out``; returns the final manifest."""
    s.check()
    # capture stores the teacher's top-k of its own full distribution: a model in this process
    check_spec(s.teacher, [Need("capture", ("logits",), s.temperature)], where=f"--teacher {s.teacher}")
    out = Path(s.out)
    tokenizer = load_tokenizer(s.teacher)
    template, note = resolve_template(s.template, {"teacher": tokenizer}, override="--template ")
    if note:
        print(f"[lmdistill] {note}")
    s = replace(s, template=template)
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
    vocab = model_vocab(model, tokenizer)
    spec = cache_spec(tokenizer, model_fingerprint(s.teacher), examples, s, vocab)
    old = check_out(out, spec)
    for stale in [*out.glob(".shard-*.tmp"), *out.glob(".manifest.json.*.tmp")]:   # being written at a kill -9
        stale.unlink()
    t0 = time.time()
    head = {**spec, "batch_size": s.batch_size, "dtype": s.dtype, "shards": -(-len(rows) // s.shard_rows),
            "rows": len(rows)}
    entries, reused, rewritten = capture_shards(model, tokenizer, rows, s, head, earlier_entries(
        old, out, head["shards"]))
    total_tokens = sum(len(r.response_ids) for r in rows)
    done_bytes = sum(e["size"] for e in entries)
    manifest = {**head, "complete": True, "shards_done": head["shards"], SHARD_FILES: entries,
                "tokens": total_tokens, "bytes": done_bytes, "bytes_per_token": done_bytes / max(total_tokens, 1),
                "shards_reused": reused, "shards_rewritten": rewritten, "seconds": round(time.time() - t0, 2),
                "filters": [str(r) for r in reports]}
    write_manifest(out, manifest)
    kept = f"{reused} of {head['shards']} shards kept from an earlier run" if reused else ""
    fixed = f"rewrote {len(rewritten)} damaged shard(s): {', '.join(rewritten)}" if rewritten else ""
    print(f"[lmdistill] captured {len(rows)} rows, {total_tokens} tokens, top-{spec['top_k']}: "
          f"{done_bytes / 1e6:.2f} MB, {manifest['bytes_per_token']:.1f} bytes/token -> {out}"
          + (f" ({'; '.join(x for x in (kept, fixed) if x)})" if kept or fixed else ""))
    return manifest


def capture_shards(model, tokenizer, rows, s: CaptureSettings, head: dict,
                   entries: list[dict | None]) -> tuple[list[dict], int, list[str]]:
    """Score and write every shard that is not already there intact; the manifest (``head`` plus the entries so
    far) is rewritten after each shard written. Returns the entries, the number of shards kept and the names of
    the damaged ones rewritten (each said as it is)."""
    out, device = Path(s.out), next(model.parameters()).device
    keys = [row_key(r.input_ids, r.loss_mask) for r in rows]
    write_manifest(out, {**head, "complete": False, "shards_done": 0, SHARD_FILES: entries})
    bar = tqdm(total=sum(len(r.response_ids) for r in rows), unit="tok", desc="capture", disable=not s.progress,
               dynamic_ncols=True)
    done_bytes = done_tokens = reused = 0
    rewritten: list[str] = []
    for i in range(head["shards"]):
        shard_rows = rows[i * s.shard_rows:(i + 1) * s.shard_rows]
        path, where = shard_path(out, i), (i * s.shard_rows, (shard_rows[0].id, shard_rows[-1].id))
        kept, why = shard_status(path, entries[i], keys[i * s.shard_rows:(i + 1) * s.shard_rows], *where)
        if kept is not None:
            reused += 1
        else:
            if entries[i] is not None:   # forget the damaged shard's entry first: a kill mid-rewrite leaves no lie
                entries[i] = None
                write_manifest(out, {**head, "complete": False, "shards_done": i, SHARD_FILES: entries})
            parts = []
            for j in range(0, len(shard_rows), s.batch_size):
                parts += score_rows(model, shard_rows[j:j + s.batch_size], head["vocab"], head["top_k"],
                                    s.temperature, tokenizer.pad_token_id, device)
            kept = write_shard(path, keys[i * s.shard_rows:(i + 1) * s.shard_rows], parts, head["vocab"],
                               s.logprob_dtype, first_row=where[0], ids=where[1])
        if kept != entries[i]:
            entries[i] = kept
            write_manifest(out, {**head, "complete": False, "shards_done": i + 1, SHARD_FILES: entries})
        if why is not None:
            rewritten.append(path.name)
            bar.write(f"[lmdistill] {path.name} ({rows_held({**head, SHARD_FILES: entries}, i)}) {why}: rewritten")
        done_bytes += kept["size"]
        done_tokens += sum(len(r.response_ids) for r in shard_rows)
        bar.update(sum(len(r.response_ids) for r in shard_rows))
        bar.set_postfix(bytes_per_token=f"{done_bytes / max(done_tokens, 1):.0f}")
    bar.close()
    return entries, reused, rewritten


__all__ = ["CaptureSettings", "SPEC_FIELDS", "capture"]
