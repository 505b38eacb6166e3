"""A model shared by concurrent decoders: the model, the lock that serialises its forward passes, the tokens
that end an answer, and its context length.

Both token sources (``decoder.solo_steps``: one request alone; ``batcher.Batcher``: continuous batching) and the
text engine (``engine.ChatEngine``) hold the same ``ModelHandle``, so one forward pass runs on the model at a
time whichever path asked for it, and a stop token ends a request the same way on both paths.
"""

from __future__ import annotations

import threading

import torch


def max_positions(model) -> int | None:
    """The model's context length as its config says it (``None``: it does not say)."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def stop_token_ids(tokenizer) -> set[int]:
    """The tokens that end an answer: the tokenizer's EOS and, where the vocabulary has it, ``<|end|>``."""
    eos = tokenizer.eos_token_id
    stop = {eos} if eos is not None else set()
    if "<|end|>" in tokenizer.get_vocab():
        stop.add(tokenizer.convert_tokens_to_ids("<|end|>"))
    return stop


class ModelHandle:
    """``model`` with its forward lock, ``stop_ids`` and ``max_positions``."""

    def __init__(self, model, stop_ids: set[int]):
        self.model = model
        self.lock = threading.Lock()
        self.stop_ids = set(stop_ids)
        self.max_positions = max_positions(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
