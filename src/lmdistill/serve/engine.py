"""Generation and scoring for a local causal LM: chat template, greedy or sampled decoding, streaming, logprobs.

One ``ChatEngine`` wraps a model and its tokenizer. A lock serialises the forward passes, so the engine can
be shared by concurrent server requests or client threads safely: one decoding step on the model at a
time, and concurrent requests take turns token by token (each keeps its own KV cache).

With ``max_batch_size`` the engine decodes through a ``batcher.Batcher`` instead: concurrent requests run as
one batch (continuous batching: they join and leave at step boundaries), each keeping its own settings, and
the same text loop (stop strings, holdback, multi-byte characters) reads the tokens of either path.

Chat (``stream`` / ``complete``: messages through the chat template) and raw completions (``stream_ids`` /
``complete_ids``: token ids as given) share one decode loop. ``complete_ids`` can also score: the
log-probabilities (``log_softmax`` of the raw logits, no temperature) of the prompt tokens, from the one forward
pass over the prompt that generation makes anyway, and of each generated token.

A prompt far too long for the context is refused before it is tokenized: ``max_chars_per_token`` bounds how
many characters one token can cover (see ``chars_per_token_bound``), so a text longer than the room in the
window times that bound cannot fit, whatever its tokens, and tokenizing megabytes to learn so is skipped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch

from lmdistill.data.prompt_prefix import add_prompt_prefix
from lmdistill.errors import LmdistillError
from lmdistill.generation.sampling import filter_logits
from lmdistill.models.kv_cache import cache_kwargs


class ContextLengthError(LmdistillError):
    """The prompt plus ``max_tokens`` does not fit the model's context window."""


@dataclass
class TokenLogprob:
    """The score of one token: its log-probability and rank (1 = most likely) and the ``k`` most likely tokens."""

    token: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    token_ids: list[int] = field(default_factory=list)  # the generated tokens
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None first), when asked


SCORE_CHUNK = 512  # prompt positions per log_softmax, so a long prompt never holds [T, V] float32 twice


def score_rows(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """``TokenLogprob`` of ``targets[t]`` under ``logits[t]`` ([T, V], any dtype) with the top ``k``, batched."""
    out: list[TokenLogprob] = []
    tgt = torch.tensor(targets, device=logits.device, dtype=torch.long)
    k = min(k, logits.shape[-1])
    for s in range(0, len(targets), SCORE_CHUNK):
        lp = torch.log_softmax(logits[s:s + SCORE_CHUNK].float(), dim=-1)
        t = tgt[s:s + SCORE_CHUNK]
        actual = lp.gather(1, t[:, None])[:, 0]
        rank = (lp > actual[:, None]).sum(-1) + 1
        if k > 0:
            vals, idx = lp.topk(k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        else:
            tops = [[] for _ in range(len(t))]
        out += [TokenLogprob(a, b, c, d) for a, b, c, d in zip(t.tolist(), actual.tolist(), rank.tolist(), tops)]
    return out


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


CHARS_SAFETY = 4  # normalizers that compose (NFC: e + U+0301 -> é; Hangul jamo: 3 -> 1) shrink text up to 3x
TRUNCATE_MARGIN = 64  # extra tokens' worth of text kept when only the tail of an over-long prompt is tokenized

# tokenizers-library components that never drop input characters (they map, compose or split them)
_SAFE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend", "Replace", "Sequence"}
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts", "Sequence"}


def _components_keep_text(node, safe: set[str]) -> bool:
    if node is None:
        return True
    kind = node.get("type")
    if kind not in safe:
        return False
    if kind == "Replace":  # a plain-string replacement no shorter than what it replaces
        pattern = node.get("pattern") or {}
        return "String" in pattern and len(node.get("content", "")) >= len(pattern["String"])
    if kind == "Split" and str(node.get("behavior", "")).lower() == "removed":
        return False
    parts = node.get("normalizers") or node.get("pretokenizers") or []
    return all(_components_keep_text(n, safe) for n in parts)


def chars_per_token_bound(tokenizer) -> int | None:
    """An upper bound on the characters of input text one token can stand for, or ``None`` when none is known.

    ``CHARS_SAFETY`` times the longest vocabulary entry (byte-level vocabularies spell each byte as one
    character, so this is also the most bytes a token covers), for a fast tokenizer whose normalizer and
    pre-tokenizer never drop characters, whose model is BPE without fused unknowns, and whose added tokens
    strip no neighbouring whitespace. For anything else (BERT-style whitespace removal, WordPiece's one [UNK]
    per long word, ...) ``None``: such prompts are always tokenized.
    """
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # a tokenizer that cannot describe itself: no bound
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("fuse_unk") and not model.get("byte_fallback")):
        return None
    if not (_components_keep_text(spec.get("normalizer"), _SAFE_NORMALIZERS)
            and _components_keep_text(spec.get("pre_tokenizer"), _SAFE_PRE_TOKENIZERS)):
        return None
    if any(a.get("lstrip") or a.get("rstrip") for a in spec.get("added_tokens") or []):
        return None
    longest = max((len(t) for t in tokenizer.get_vocab()), default=0)
    return CHARS_SAFETY * longest if longest > 0 else None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a vocabulary entry uses -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class ChatEngine:
    """Generate chat answers with ``model`` and ``tokenizer``.

    ``truncate_prompt``: when a prompt is too long for the context window, keep its last tokens instead of
    raising ``ContextLengthError`` (the default, as OpenAI-compatible servers do). ``max_batch_size``: decode
    concurrent requests together, at most this many at once (``None``/0: each alone, taking turns per token);
    ``max_queue``: with batching, how many more may wait before ``batcher.QueueFull`` (``None``: unbounded).
    """

    def __init__(self, model, tokenizer, *, truncate_prompt: bool = False, max_batch_size: int | None = None,
                 max_queue: int | None = None):
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
        self._pieces: dict[int, str] = {}
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_rows = getattr(emb, "num_embeddings", None) or len(tokenizer)  # valid input ids: 0..rows-1
        self.max_chars_per_token = chars_per_token_bound(tokenizer)
        self._bytes: dict[int, list[int]] = {}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._special = set(getattr(tokenizer, "all_special_ids", None) or [])
        self._special |= set(getattr(tokenizer, "added_tokens_decoder", None) or {})
        self.batcher = None
        if max_batch_size:
            from lmdistill.serve.batcher import Batcher

            self.batcher = Batcher(self, max_batch=max_batch_size, max_queue=max_queue)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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
        bound = self.max_chars_per_token
        if self.max_positions is not None and bound is not None:
            room = max(self.max_positions - max_tokens, 0)
            if len(text) > room * bound:
                if not truncate or room < 1:
                    raise ContextLengthError(
                        f"this model's maximum context length is {self.max_positions} tokens; {what} more than "
                        f"{room} tokens ({len(text)} characters, at most {bound} per token for this tokenizer) "
                        f"and max_tokens is {max_tokens}")
                text = text[-(room + TRUNCATE_MARGIN) * bound:]
                add_special_tokens = False  # a prefix token (BOS) would sit inside the cut anyway
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def fit(self, ids: list[int], max_tokens: int, *, truncate: bool = False,
            what: str = "the prompt uses") -> list[int]:
        """``ids`` if they and ``max_tokens`` fit the context window; else their last tokens (``truncate``) or
        ``ContextLengthError``."""
        if self.max_positions is not None and len(ids) + max_tokens > self.max_positions:
            room = self.max_positions - max_tokens
            if not truncate or room < 1:
                raise ContextLengthError(
                    f"this model's maximum context length is {self.max_positions} tokens; {what} "
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
        """The decode loop of ``stream`` over prompt token ids as given (the caller checks their length).

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
        gens = [self._generator(temperature, seed) for _ in prompts]
        if self.batcher is not None:
            steps = self.batcher.submit([
                {"ids": list(ids), "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "gen": gen,
                 "logprobs": logprobs, "prompt_logprobs": prompt_logprobs} for ids, gen in zip(prompts, gens)])
        else:
            steps = [self._steps(ids, max_tokens, temperature, top_p, gen, logprobs, prompt_logprobs)
                     for ids, gen in zip(prompts, gens)]
        return [self._text(ids, s, stop=stop, logprobs=logprobs, scores_out=out)
                for ids, s, out in zip(prompts, steps, scores_out)]

    def _generator(self, temperature: float, seed: int | None) -> torch.Generator | None:
        """A request's own random generator (``None`` for greedy): seeded, it draws the same alone or batched."""
        if temperature <= 0:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed) if seed is not None else torch.seed())
        return gen

    def _score(self, logits: torch.Tensor, token: int, k: int | None) -> TokenLogprob | None:
        """The chosen token's score under its step's ``[V]`` logits, when asked (never for a stop token)."""
        if k is None or token in self.stop_ids:
            return None
        return score_rows(logits[None], [token], k)[0]

    def _steps(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, gen, logprobs: int | None,
               prompt_logprobs: int | None):
        """The unbatched token source: the request alone on the HF forward with its own ``DynamicCache``. Yields
        ``(token, score, prompt_scores)`` per step (``(None, None, prompt_scores)`` once when ``max_tokens`` is 0),
        as a ``batcher.Ticket`` does."""
        input_ids = torch.tensor([ids], device=self.device)
        if prompt_logprobs is not None and max_tokens == 0:
            with self.lock, torch.inference_mode():
                logits = self.model(input_ids=input_ids).logits[0]
                prompt_scores = [None, *score_rows(logits[:-1], ids[1:], prompt_logprobs)]
            yield None, None, prompt_scores
            return
        from transformers import DynamicCache

        cache = cache_kwargs(self.model, DynamicCache(config=self.model.config))  # filled in place
        for step in range(max_tokens):
            # the lock is held per decoding step, never across a yield: a client that stops reading a
            # stream cannot block the model for everyone else
            with self.lock, torch.inference_mode():
                outputs = self.model(input_ids=input_ids, **cache, use_cache=True)
                last = outputs.logits[0, -1].float()
                token = self._pick(last, temperature, top_p, gen)
                prompt_scores = None
                if prompt_logprobs is not None and step == 0:  # the first step saw the whole prompt
                    prompt_scores = [None, *score_rows(outputs.logits[0, :-1], ids[1:], prompt_logprobs)]
            yield token, self._score(last, token, logprobs), prompt_scores
            input_ids = torch.tensor([[token]], device=self.device)

    def _text(self, ids: list[int], steps, *, stop: list[str] | None, logprobs: int | None,
              scores_out: list | None) -> Iterator[tuple[str, Completion | None]]:
        """Tokens from ``steps`` (``_steps`` or a batcher ticket) to text deltas and the final ``Completion``."""
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
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.tokenizer.decode([token])
        return text

    def token_bytes(self, token: int) -> list[int]:
        """The UTF-8 bytes one token stands for (a byte-level token may hold part of a character), cached."""
        raw = self._bytes.get(token)
        if raw is None:
            raw = None
            if self._byte_level and token not in self._special:
                table = _BYTE_DECODER
                spelled = self.tokenizer.convert_ids_to_tokens(token)
                if isinstance(spelled, str) and all(c in table for c in spelled):
                    raw = [table[c] for c in spelled]
            if raw is None:
                raw = list(self.piece(token).encode("utf-8"))
            self._bytes[token] = raw
        return raw

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen) -> int:
        if temperature <= 0:
            return int(torch.argmax(logits))
        # the nucleus rule of the sequence engine (generation.sampling.filter_logits), drawn with the request's generator
        scaled = logits / temperature
        if not torch.isfinite(scaled.max()):   # a temperature so small (1e-40) that logits / T overflows: its limit
            return int(torch.argmax(logits))
        probs = torch.softmax(filter_logits(scaled, top_p=top_p), dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen))


_BYTE_DECODER = _byte_decoder()


def _last(stream) -> Completion:
    result = None
    for _, done in stream:
        result = done or result
    assert result is not None
    return result


def _stop_index(text: str, stop: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None
