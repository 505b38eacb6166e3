"""The token source of one model: requests in, per request an iterator of ``(token, score, prompt scores)`` out.

``Decoder.submit`` runs each request alone (``solo_steps``: the HF forward with the request's own
``DynamicCache``, the model's lock held per step, so concurrent requests take turns token by token), or, with
``max_batch_size``, queues them on a ``batcher.Batcher`` (continuous batching). Either way a request yields
``(token, TokenLogprob | None, prompt scores | None)`` per step (``(None, None, prompt scores)`` once when
``max_tokens`` is 0), chosen by ``sampler.pick`` and scored by ``scoring``; ``engine.ChatEngine`` turns those
tokens into text. Closing an iterator ends its request (a batched one leaves the batch).

A request is a dict of ``batcher.Batcher.submit``'s fields: ``ids``, ``max_tokens``, ``temperature``, ``top_p``,
``gen`` (its ``torch.Generator``, ``sampler.request_generator``), ``logprobs``, ``prompt_logprobs``.
"""

from __future__ import annotations

from typing import Iterator

import torch

from lmdistill.decoding.batcher import Batcher
from lmdistill.decoding.handle import ModelHandle
from lmdistill.decoding.sampler import pick
from lmdistill.decoding.scoring import prompt_scores, score_token
from lmdistill.models.kv_cache import cache_kwargs


def solo_steps(handle: ModelHandle, ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               gen: torch.Generator | None = None, logprobs: int | None = None,
               prompt_logprobs: int | None = None) -> Iterator[tuple]:
    """One request alone on the HF forward with its own ``DynamicCache``: ``(token, score, prompt_scores)`` per
    step; ``prompt_logprobs`` from the first forward, which sees the whole prompt (a single forward when
    ``max_tokens`` is 0)."""
    model = handle.model
    input_ids = torch.tensor([ids], device=handle.device)
    if prompt_logprobs is not None and max_tokens == 0:
        with handle.lock, torch.inference_mode():
            scores = prompt_scores(model(input_ids=input_ids).logits[0], ids, prompt_logprobs)
        yield None, None, scores
        return
    from transformers import DynamicCache

    cache = cache_kwargs(model, DynamicCache(config=model.config))  # filled in place
    for step in range(max_tokens):
        # the lock is held per decoding step, never across a yield: a client that stops reading a
        # stream cannot block the model for everyone else
        with handle.lock, torch.inference_mode():
            outputs = model(input_ids=input_ids, **cache, use_cache=True)
            last = outputs.logits[0, -1].float()
            token = pick(last, temperature, top_p, gen)
            scores = None
            if prompt_logprobs is not None and step == 0:
                scores = prompt_scores(outputs.logits[0], ids, prompt_logprobs)
        yield token, score_token(last, token, logprobs, handle.stop_ids), scores
        input_ids = torch.tensor([[token]], device=handle.device)


class Decoder:
    """The token source of ``handle``'s model: each request alone, or batched (``max_batch_size``; ``max_queue``:
    how many more may wait before ``batcher.QueueFull``, ``None``: unbounded)."""

    def __init__(self, handle: ModelHandle, *, max_batch_size: int | None = None, max_queue: int | None = None):
        self.handle = handle
        self.batcher = Batcher(handle, max_batch=max_batch_size, max_queue=max_queue) if max_batch_size else None

    def submit(self, requests: list[dict]) -> list[Iterator[tuple]]:
        """One step iterator per request, in order. Batched, they are queued now, all or none (``QueueFull`` is
        raised here, before anything is read); alone, each runs as its iterator is read."""
        if self.batcher is not None:
            return self.batcher.submit(requests)
        return [solo_steps(self.handle, **r) for r in requests]

    def close(self) -> None:
        """Stop the batcher's scheduler (requests still queued or running end with an error)."""
        if self.batcher is not None:
            self.batcher.close()
