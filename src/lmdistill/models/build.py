"""Llama-style causal LMs of named sizes, built locally and saved as Hugging Face folders.

Sizes (with the 4096-token shared tokenizer, tied embeddings):
``micro`` ~0.1M parameters (unit tests), ``tiny-student`` ~1.3M, ``tiny-teacher`` ~5.8M.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmdistill.errors import ConfigError
from lmdistill.models.tokenizer import build_tokenizer


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    kv_heads: int | None = None


SIZES: dict[str, Size] = {
    "micro": Size(hidden=24, layers=2, heads=2, intermediate=64),
    "tiny-student": Size(hidden=128, layers=4, heads=4, intermediate=344),
    "tiny-teacher": Size(hidden=256, layers=6, heads=8, intermediate=688, kv_heads=4),
}


def llama_config(size: str, tokenizer, vocab_size: int | None = None, max_positions: int = 1024):
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ConfigError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    s = SIZES[size]
    return LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=s.hidden, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads or s.heads, intermediate_size=s.intermediate,
        max_position_embeddings=max_positions, rms_norm_eps=1e-6, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, initializer_range=0.02,
    )


def build_model(size: str, out_dir: str | Path | None = None, *, tokenizer=None, seed: int = 0,
                pad_vocab_to: int | None = None):
    """Initialise a ``size`` model with ``seed``; save model + tokenizer to ``out_dir`` if given.

    ``pad_vocab_to`` pads the embedding matrix to a larger vocabulary (extra rows never produced by
    the tokenizer), like Qwen2.5 7B's 152064 rows against 0.5B's 151936, to test mismatch handling.
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    if pad_vocab_to is not None and pad_vocab_to < len(tokenizer):
        raise ConfigError(f"pad_vocab_to={pad_vocab_to} is smaller than the tokenizer's {len(tokenizer)} tokens")
    config = llama_config(size, tokenizer, vocab_size=pad_vocab_to)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                               bos_token_id=tokenizer.bos_token_id)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    return model, tokenizer


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
