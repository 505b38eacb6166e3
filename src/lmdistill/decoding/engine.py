"""Chat answers and raw completions as text: prompt rendering and encoding, and the text loop over a token source.

One ``ChatEngine`` wraps a model and its tokenizer. Its ``decoder.Decoder`` makes the tokens: each request alone
(the model's lock held per step, so concurrent requests take turns token by token, each with its own KV cache),
or, with ``max_batch_size``, through a ``batcher.Batcher`` (continuous batching: concurrent requests run as one
batch, joining and leaving at step boundaries, each keeping its own settings). The engine is safe to share
between concurrent server requests or client threads.

Chat (``stream`` / ``complete``: messages through the chat template) and raw completions (``stream_ids`` /
``complete_ids``: token ids as given) share one text loop (``_text``): stop strings end generation and are not
included in the text (a possible stop-string prefix is held back until it is resolved), and a multi-byte
character is emitted whole. ``complete_ids`` can also score (``scoring``): the prompt tokens, from the one forward
pass over the prompt that generation makes anyway, and each generated token.

A prompt far too long for the context is refused before it is tokenized: ``max_chars_per_token`` bounds how
many characters one token can cover (``token_text.chars_per_token_bound``), so a text longer than the room in
the window times that bound cannot fit, whatever its tokens, and tokenizing megabytes to learn so is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from lmdistill.data.prompt_prefix import add_prompt_prefix
from lmdistill.decoding.decoder import Decoder
from lmdistill.decoding.handle import ModelHandle, stop_token_ids
from lmdistill.decoding.sampler import request_generator
from lmdistill.decoding.scoring import TokenLogprob
from lmdistill.decoding.token_text import TokenText, chars_per_token_bound
from lmdistill.errors import LmdistillError

TRUNCATE_MARGIN = 64  # extra tokens' worth of text kept when only the tail of an over-long prompt is tokenized


class ContextLengthError(LmdistillError):
    """The prompt plus ``max_tokens`` does not fit the model's context window."""


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    token_ids: list[int] = field(default_factory=list)  # the generated tokens
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None first), when asked


class ChatEngine:
    """Generate chat answers with ``model`` and ``tokenizer``.

    ``truncate_prompt``: when a prompt is too long for the context window, keep its last tokens instead of
    raising ``ContextLengthError`` (the default, as OpenAI-compatible servers do). ``max_batch_size``: decode
    concurrent requests together, at most this many at once (``None``/0: each alone, taking turns per token);
    ``max_queue``: with batching, how many more may wait before ``batcher.QueueFull`` (``None``: unbounded).
    """

    def __init__(self, model, tokenizer, *, truncate_prompt: bool = False, max_batch_size: int | None = None,
                 max_queue: int | None = None):
        self.tokenizer = tokenizer
        self.truncate_prompt = truncate_prompt
        self.handle = ModelHandle(model, stop_token_ids(tokenizer))
        self.decoder = Decoder(self.handle, max_batch_size=max_batch_size, max_queue=max_queue)
        self.tokens = TokenText(tokenizer)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_rows = getattr(emb, "num_embeddings", None) or len(tokenizer)  # valid input ids: 0..rows-1
        self.max_chars_per_token = chars_per_token_bound(tokenizer)

    @property
    def model(self):
        return self.handle.model

    @property
    def device(self) -> torch.device:
        return self.handle.device

    @property
    def max_positions(self) -> int | None:
        return self.handle.max_positions

    @property
    def stop_ids(self) -> set[int]:
        """The tokens that end an answer (``handle.stop_ids``, which both token sources read)."""
        return self.handle.stop_ids

    @property
    def batcher(self):
        """The ``batcher.Batcher`` decoding this engine's requests (``None``: each decodes alone)."""
        return self.decoder.batcher

    def prompt_text(self, messages: list[dict]) -> str:
        """The messages through the chat template (or a plain role-prefixed transcript for a base model)."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def prompt_ids(self, messages: list[dict], max_tokens: int) -> list[int]:
        ids = self.encode(self.prompt_text(messages), max_tokens, truncate=self.truncate_prompt,
                          add_special_tokens=False, what="the messages use")
        ids = add_prompt_prefix(ids, self.tokenizer)   # Gemma's <bos> unless the chat template rendered it
        return self.fit(ids, max_tokens, truncate=self.truncate_prompt, what="the messages use")

    def encode(self, text: str, max_tokens: int, *, truncate: bool = False, add_special_tokens: bool = False,
               what: str = "the prompt uses") -> list[int]:
        """``text``'s token ids, refusing (``ContextLengthError``) without tokenizing a text that cannot fit
        the window beside ``max_tokens``: more than ``room * max_chars_per_token`` characters. With ``truncate``
        only the text's tail that can hold the room (plus ``TRUNCATE_MARGIN`` tokens) is tokenized; the caller
        still ``fit``s the ids, which keeps their last tokens."""
        bound, positions = self.max_chars_per_token, self.max_positions
        if positions is not None and bound is not None:
            room = max(positions - max_tokens, 0)
            if len(text) > room * bound:
                if not truncate or room < 1:
                    raise ContextLengthError(
                        f"this model's maximum context length is {positions} tokens; {what} more than "
                        f"{room} tokens ({len(text)} characters, at most {bound} per token for this tokenizer) "
                        f"and max_tokens is {max_tokens}")
                text = text[-(room + TRUNCATE_MARGIN) * bound:]
                add_special_tokens = False  # a prefix token (BOS) would sit inside the cut anyway
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def fit(self, ids: list[int], max_tokens: int, *, truncate: bool = False,
            what: str = "the prompt uses") -> list[int]:
        """``ids`` if they and ``max_tokens`` fit the context window; else their last tokens (``truncate``) or
        ``ContextLengthError``."""
        positions = self.max_positions
        if positions is not None and len(ids) + max_tokens > positions:
            room = positions - max_tokens
            if not truncate or room < 1:
                raise ContextLengthError(
                    f"this model's maximum context length is {positions} tokens; {what} "
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
        yield from self.stream_ids(ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                   stop=stop)

    def stream_ids(self, ids: list[int], *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None, stop: list[str] | None = None, logprobs: int | None = None,
                   prompt_logprobs: int | None = None,
                   scores_out: list | None = None) -> Iterator[tuple[str, Completion | None]]:
        """The text loop of ``stream`` over prompt token ids as given (the caller checks their length).

        ``logprobs=K``: the ``Completion`` carries a ``TokenLogprob`` with the top K for each generated token;
        ``prompt_logprobs=K``: one for each prompt token after the first (taken from the first forward pass, or
        from a single forward pass when ``max_tokens`` is 0). ``scores_out``: a list the generated tokens'
        ``TokenLogprob`` are appended to as they come (a stream's chunks carry the scores of their tokens).

        With a batcher the request is queued now (``QueueFull`` is raised here, before anything is read) and
        decoded in the running batch; closing the returned iterator cancels it.
        """
        return self._many_ids([ids], max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              stop=stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              scores_out=[scores_out])[0]

    def _many_ids(self, prompts: list[list[int]], *, max_tokens: int, temperature: float, top_p: float,
                  seed: int | None, stop: list[str] | None, logprobs: int | None, prompt_logprobs: int | None,
                  scores_out: list) -> list[Iterator[tuple[str, Completion | None]]]:
        steps = self.decoder.submit([
            {"ids": list(ids), "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
             "gen": request_generator(self.device, temperature, seed), "logprobs": logprobs,
             "prompt_logprobs": prompt_logprobs} for ids in prompts])
        return [self._text(ids, s, stop=stop, logprobs=logprobs, scores_out=out)
                for ids, s, out in zip(prompts, steps, scores_out)]

    def _text(self, ids: list[int], steps, *, stop: list[str] | None, logprobs: int | None,
              scores_out: list | None) -> Iterator[tuple[str, Completion | None]]:
        """Tokens from ``steps`` (a ``decoder.Decoder`` step iterator) to text deltas and the final
        ``Completion``."""
        stop = [s for s in (stop or []) if s]
        holdback = max((len(s) for s in stop), default=1) - 1  # never emit what may become a stop string
        out_ids: list[int] = []
        scores: list[TokenLogprob] = scores_out if scores_out is not None else []
        prompt_scores: list[TokenLogprob | None] | None = None
        emitted = ""
        finish = "length"
        try:
            for token, score, step_prompt_scores in steps:
                if step_prompt_scores is not None:
                    prompt_scores = step_prompt_scores
                if token is None:
                    continue
                if score is not None:
                    scores.append(score)
                if token in self.stop_ids:
                    finish = "stop"
                    break
                out_ids.append(token)
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
        finally:  # done, a stop string, or the reader gone: the source stops (a batched request leaves the batch)
            steps.close()
        final = self.tokenizer.decode(out_ids, skip_special_tokens=True)
        cut = _stop_index(final, stop)
        if cut is not None:
            final = final[:cut]
        if len(final) > len(emitted) and final.startswith(emitted):
            yield final[len(emitted):], None
        yield "", Completion(final, len(ids), len(out_ids), finish, out_ids,
                             scores if logprobs is not None else None, prompt_scores)

    def complete(self, messages: list[dict], **kwargs) -> Completion:
        return _last(self.stream(messages, **kwargs))

    def complete_ids(self, ids: list[int], **kwargs) -> Completion:
        """``stream_ids`` to its end: the generated text, token ids and (when asked) the logprobs."""
        return _last(self.stream_ids(ids, **kwargs))

    def complete_many_ids(self, prompts: list[list[int]], **kwargs) -> list[Completion]:
        """``complete_ids`` of each prompt, in order. With a batcher they are queued together (all or none:
        ``QueueFull``) and decode as one batch; without, one after another."""
        if self.batcher is None:
            return [self.complete_ids(ids, **kwargs) for ids in prompts]
        kwargs = {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": None, "logprobs": None,
                  "prompt_logprobs": None, **kwargs}
        streams = self._many_ids(prompts, **kwargs, scores_out=[None] * len(prompts))
        return [_last(s) for s in streams]

    def piece(self, token: int) -> str:
        """The text of one token on its own (cached)."""
        return self.tokens.piece(token)

    def token_bytes(self, token: int) -> list[int]:
        """The UTF-8 bytes one token stands for (a byte-level token may hold part of a character), cached."""
        return self.tokens.token_bytes(token)

    def close(self) -> None:
        """Stop the batcher's scheduler, if any (an unbatched engine holds no thread)."""
        self.decoder.close()


def _last(stream) -> Completion:
    result = None
    for _, done in stream:
        result = done or result
    assert result is not None
    return result


def _stop_index(text: str, stop: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None
