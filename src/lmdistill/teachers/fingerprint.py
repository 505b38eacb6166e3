"""Hashes that tie a teacher cache to what it was captured from: the teacher's files, its tokenizer, the data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

#: Files of a model folder that decide its outputs (weights and configuration).
MODEL_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".json", ".model")


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(name: str) -> str:
    """sha256 over the names and contents of a model folder's weight and config files; a hub id hashes as its name."""
    root = Path(name)
    if not root.is_dir():
        return hashlib.sha256(f"hub:{name}".encode()).hexdigest()
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in MODEL_SUFFIXES and not p.name.startswith("."):
            h.update(f"{p.relative_to(root)}\0{file_sha256(p)}\0".encode())
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what makes two tokenizers give the same ids: the vocabulary, the special ids, the chat template."""
    blob = json.dumps({"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
                       "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id,
                       "chat_template": getattr(tokenizer, "chat_template", None)}, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def examples_hash(examples) -> str:
    """sha256 of the examples' content (ids, prompts, outputs, messages), whatever file format they came from."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.id, ex.instruction, ex.input, ex.output, ex.messages], ensure_ascii=False)
                 .encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def row_key(input_ids: list[int], loss_mask: list[int]) -> str:
    """The cache key of one training row: sha1 of its token ids and loss mask (same tokens, same scores)."""
    h = hashlib.sha1()
    h.update(json.dumps([list(input_ids), list(loss_mask)], separators=(",", ":")).encode())
    return h.hexdigest()
