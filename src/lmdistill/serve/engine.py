"""Chat generation for a local causal LM: chat template, greedy or sampled decoding, streaming.

One ``ChatEngine`` wraps a model and its tokenizer. A lock serialises the forward passes, so the engine can
be shared by concurrent server requests or client threads safely: one decoding step on the model at a
time, and concurrent requests take turns token by token (each keeps its own KV cache).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from lmdistill.errors import LmdistillError
from lmdistill.generation.sampling import filter_logits
from lmdistill.models.kv_cache import cache_kwargs


class ContextLengthError(LmdistillError):
    """The prompt plus ``max_tokens`` does not fit the model's context window."""


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class ChatEngine:
    """Generate chat answers with ``model`` and ``tokenizer``.

    ``truncate_prompt``: when a prompt is too long for the context window, keep its last tokens instead of
    raising ``ContextLengthError`` (the default, as OpenAI-compatible servers do).
    """

    def __init__(self, model, tokenizer, *, truncate_prompt: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.truncate_prompt = truncate_prompt
        self.max_positions = _max_positions(model)
        self.lock = threading.Lock()
        eos = tokenizer.eos_token_id
        self.stop_ids = {eos} if eos is not None else set()
        end = tokenizer.convert_tokens_to_ids("<|end|>") if "<|end|>" in tokenizer.get_vocab() else None
        if end is not None:
            self.stop_ids.add(end)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_ids(self, messages: list[dict], max_tokens: int) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model without a template: plain role-prefixed transcript
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.max_positions is not None and len(ids) + max_tokens > self.max_positions:
            room = self.max_positions - max_tokens
            if not self.truncate_prompt or room < 1:
                raise ContextLengthError(
                    f"this model's maximum context length is {self.max_positions} tokens; the messages use "
                    f"{len(ids)} tokens and max_tokens is {max_tokens}")
            ids = ids[-room:]
        return ids

    def stream(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop: list[str] | None = None) -> Iterator[tuple[str, Completion | None]]:
        """Yield ``(text_delta, None)`` pieces, then ``("", Completion)`` once at the end.

        Decoding is token by token with the KV cache; temperature 0 is greedy. Deltas are the growth of the
        decoded text, so multi-byte characters are emitted whole. ``stop`` strings end generation and are
        not included in the text (a possible stop-string prefix is held back until it is resolved).
        """
        ids = self.prompt_ids(messages, max_tokens)
        stop = [s for s in (stop or []) if s]
        holdback = max((len(s) for s in stop), default=1) - 1  # never emit what may become a stop string
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(seed) if seed is not None else torch.seed())
        input_ids = torch.tensor([ids], device=self.device)
        from transformers import DynamicCache

        cache = cache_kwargs(self.model, DynamicCache(config=self.model.config))  # filled in place
        out_ids: list[int] = []
        emitted = ""
        finish = "length"
        for _ in range(max_tokens):
            # the lock is held per decoding step, never across a yield: a client that stops reading a
            # stream cannot block the model for everyone else
            with self.lock, torch.inference_mode():
                outputs = self.model(input_ids=input_ids, **cache, use_cache=True)
                token = self._pick(outputs.logits[0, -1].float(), temperature, top_p, gen)
            if token in self.stop_ids:
                finish = "stop"
                break
            out_ids.append(token)
            input_ids = torch.tensor([[token]], device=self.device)
            text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
            cut = _stop_index(text, stop)
            if cut is not None:
                finish = "stop"
                break
            if text.endswith("\ufffd"):
                continue  # an incomplete multi-byte character: wait for the next token
            safe = text[:max(0, len(text) - holdback)]
            if len(safe) > len(emitted) and safe.startswith(emitted):
                yield safe[len(emitted):], None
                emitted = safe
        final = self.tokenizer.decode(out_ids, skip_special_tokens=True)
        cut = _stop_index(final, stop)
        if cut is not None:
            final = final[:cut]
        if len(final) > len(emitted) and final.startswith(emitted):
            yield final[len(emitted):], None
        yield "", Completion(final, len(ids), len(out_ids), finish)

    def complete(self, messages: list[dict], **kwargs) -> Completion:
        result = None
        for _, done in self.stream(messages, **kwargs):
            result = done or result
        assert result is not None
        return result

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen) -> int:
        if temperature <= 0:
            return int(torch.argmax(logits))
        # the nucleus rule of the sequence engine (generation.sampling.filter_logits), drawn with the request's generator
        probs = torch.softmax(filter_logits(logits / temperature, top_p=top_p), dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen))


def _stop_index(text: str, stop: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None
