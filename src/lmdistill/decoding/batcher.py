"""Continuous batching: one scheduler thread decodes every running request together, one token per step.

``Batcher.submit`` queues requests and returns a ``Ticket`` per request; the scheduler thread admits waiting
requests at step boundaries while fewer than ``max_batch`` run, and a request leaves the batch as soon as it
ends (a stop token or ``max_tokens``) or its ticket is closed (a client gone, a stop string found by the
reader), so its slot is free for the next step. Each step is one forward for all running requests on the
fast decoder (``slots.SlotBatch``: each request a row of one preallocated cache, prefilled alone when it
joins), or, for a model the fast decoder does not run (``fast_decoder.unsupported_reason``: decided per
request when it joins, so a hook added later is honoured), one HF forward per request with its own
``DynamicCache``, as ``decoder.solo_steps`` decodes a request alone. The forwards take the ``ModelHandle``'s
lock, so they never overlap another path's on the same model.

Every request keeps its own settings: temperature and top-p through ``sampler.pick`` with its own
``torch.Generator`` (a seeded request draws what it draws alone), ``max_tokens``, ``logprobs`` (the chosen
token's score, ``scoring.score_token``, from the same logits row) and ``prompt_logprobs`` (from its prefill). A
``Ticket`` yields ``(token, TokenLogprob | None, prompt scores | None)`` per step, as ``decoder.solo_steps`` does,
and ``engine.ChatEngine``'s text loop reads either, so stop strings, holdback and multi-byte characters are
handled there, once, for both paths.

The queue is bounded: with ``max_queue`` set, a submission that would put more than ``max_batch + max_queue``
requests in the system raises ``QueueFull`` (the server answers 429 with ``retry_after``); an empty system
takes any submission, so a request of many prompts is never refused forever. The thread exits after
``idle_timeout`` seconds without work (dropping the cache) and restarts on the next submission, so an idle
engine holds no thread and no KV memory.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from lmdistill.decoding.handle import ModelHandle
from lmdistill.decoding.sampler import pick
from lmdistill.decoding.scoring import prompt_scores, score_token
from lmdistill.decoding.slots import SlotBatch
from lmdistill.errors import ConfigError, LmdistillError
from lmdistill.generation.fast_decoder import unsupported_reason
from lmdistill.generation.runner import note_hf_fallback
from lmdistill.models.kv_cache import cache_kwargs

BACKENDS = ("auto", "fast", "hf")
_DONE = object()
DEFAULT_POSITIONS = 4096  # the RoPE table for a model that does not say its context length
SHRINK_COLUMNS = 1024  # an emptied batch wider than this drops its cache


class QueueFull(LmdistillError):
    """Too many requests are waiting; try again in ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class BatchError(LmdistillError):
    """A request's decoding failed in the scheduler (the original error is its ``__cause__``)."""


@dataclass(eq=False)
class _Seq:
    """One request as the scheduler sees it (the consumer holds its ``Ticket``)."""

    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    gen: torch.Generator | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    generated: int = 0
    pending: int | None = None  # the last token chosen, fed at the next step
    row: int | None = None  # its row in the SlotBatch (fast path)
    cache: dict | None = None  # its DynamicCache kwargs (HF path)


class Ticket:
    """The reader's end of a request: iterate ``(token, score, prompt_scores)``; ``close()``, or dropping the
    ticket, cancels the request (the scheduler frees its slot at the next step boundary)."""

    def __init__(self, seq: _Seq):
        self._seq = seq

    def __iter__(self) -> "Ticket":
        return self

    def __next__(self):
        item = self._seq.out.get()
        if item is _DONE:
            self._seq.out.put(_DONE)  # stays ended
            raise StopIteration
        if isinstance(item, BaseException):
            self._seq.out.put(_DONE)
            raise BatchError(f"decoding failed: {type(item).__name__}: {item}") from item
        return item

    def close(self) -> None:
        self._seq.cancelled = True  # a flag only: safe from any thread, and from a finalizer

    cancel = close

    def __del__(self):
        self._seq.cancelled = True


class Batcher:
    """The scheduler of ``handle``'s model: at most ``max_batch`` requests decode together."""

    def __init__(self, handle: ModelHandle, *, max_batch: int, max_queue: int | None = None, idle_timeout: float = 2.0,
                 backend: str = "auto"):
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
        if max_queue is not None and max_queue < 0:
            raise ConfigError(f"max_queue must be at least 0, got {max_queue}")
        if backend not in BACKENDS:
            raise ConfigError(f"batch backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.handle = handle
        self.max_batch, self.max_queue, self.idle_timeout, self.backend = max_batch, max_queue, idle_timeout, backend
        self._cv = threading.Condition(threading.RLock())
        self._waiting: deque[_Seq] = deque()
        self._inflight = 0  # submitted and not finished (waiting + running)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.mean_seconds = 1.0  # moving average of a request's time in the system (for Retry-After)
        # owned by the scheduler thread
        self._rows: list[_Seq] = []  # fast path: index = cache row
        self._hf: list[_Seq] = []
        self._slots: SlotBatch | None = None
        self.steps = 0  # decode steps run
        self.peak = 0  # the most requests one step has decoded together

    # ---- the submitting side ----------------------------------------------------------------------------------

    @property
    def limit(self) -> int | None:
        return None if self.max_queue is None else self.max_batch + self.max_queue

    @property
    def inflight(self) -> int:
        """Requests submitted and not yet finished (queued or running)."""
        return self._inflight

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def full(self) -> bool:
        limit = self.limit
        return limit is not None and self._inflight >= limit

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one request's time in the system, at least 1."""
        return max(1, min(60, math.ceil(self.mean_seconds)))

    def submit(self, requests: list[dict]) -> list[Ticket]:
        """Queue ``requests`` (``_Seq`` fields: ids, max_tokens, temperature, top_p, gen, logprobs,
        prompt_logprobs) all together, or none: ``QueueFull`` when they would pass the limit."""
        seqs = [_Seq(**r) for r in requests]
        with self._cv:
            if self._closed:
                raise LmdistillError("the batcher is closed")
            limit = self.limit
            if limit is not None and self._inflight > 0 and self._inflight + len(seqs) > limit:
                raise QueueFull(f"the server is busy: {self._inflight} requests are running or waiting (at most "
                                f"{self.max_batch} run at once and {self.max_queue} wait); retry later",
                                self.retry_after())
            self._inflight += len(seqs)
            self._waiting.extend(seqs)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lmdistill-batcher", daemon=True)
                self._thread.start()
            self._cv.notify()
        return [Ticket(s) for s in seqs]

    def close(self) -> None:
        """Stop the scheduler; requests still queued or running end with an error."""
        with self._cv:
            self._closed = True
            thread = self._thread
            self._cv.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    # ---- the scheduler thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            admit = self._admissions()
            if admit is None:
                return
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    for seq in admit:
                        self._admit(seq)
                    self._step()
            except Exception as e:  # a failed step fails the running requests, not the server
                self._fail_running(e)

    def _admissions(self) -> list[_Seq] | None:
        """The waiting requests that join at this step boundary; ``None``: idle long enough (or closed), exit."""
        with self._cv:
            while True:
                if self._closed:
                    self._fail_running(LmdistillError("the batcher was closed"))
                    while self._waiting:
                        self._finish(self._waiting.popleft(), LmdistillError("the batcher was closed"))
                    self._thread = None
                    return None
                if self._waiting or self._rows or self._hf:
                    break
                if not self._cv.wait(self.idle_timeout) and not self._waiting and not self._closed:
                    self._thread, self._slots = None, None
                    return None
            free = self.max_batch - len(self._rows) - len(self._hf)
            return [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]

    def _fast(self, seq: _Seq) -> bool:
        """Whether ``seq`` runs on the fast path (checked when it joins: hooks, dtype, length)."""
        if self.backend == "hf":
            return False
        model = self.handle.model
        total = len(seq.ids) + seq.max_tokens
        if self._slots is not None and not self._slots.matches(model):
            if self._rows:
                return False  # rows of the old model still run; this one goes the HF way
            self._slots = None
        why = unsupported_reason(model, total)
        if why is not None:
            note_hf_fallback(model, why)
            return False
        if self._slots is None:
            self._slots = SlotBatch(model, self.max_batch, self.handle.max_positions or DEFAULT_POSITIONS)
        return self._slots.fits(total)

    def _admit(self, seq: _Seq) -> None:
        """Prefill ``seq`` (its first token, or only its prompt scores when ``max_tokens`` is 0)."""
        handle = self.handle
        if seq.cancelled or (seq.max_tokens == 0 and seq.prompt_logprobs is None):
            self._finish(seq)
            return
        try:
            if self._fast(seq):
                with handle.lock:
                    logits = self._slots.add(seq.ids, len(seq.ids) + seq.max_tokens,
                                             keep=0 if seq.prompt_logprobs is not None else 1)
                seq.row = len(self._rows)
                self._rows.append(seq)
            else:  # solo_steps' calls, one request at a time
                from transformers import DynamicCache

                model = handle.model
                input_ids = torch.tensor([seq.ids], device=handle.device)
                with handle.lock:
                    if seq.max_tokens == 0:
                        logits = model(input_ids=input_ids).logits[0]
                    else:
                        seq.cache = cache_kwargs(model, DynamicCache(config=model.config))
                        logits = model(input_ids=input_ids, **seq.cache, use_cache=True).logits[0]
                self._hf.append(seq)
            scores = None
            if seq.prompt_logprobs is not None:
                scores = prompt_scores(logits, seq.ids, seq.prompt_logprobs)
            if seq.max_tokens == 0:
                seq.out.put((None, None, scores))
                self._release(seq)
                self._finish(seq)
                return
            self._emit(seq, logits[-1], scores)
        except Exception as e:
            self._release(seq)
            self._finish(seq, e)

    def _step(self) -> None:
        """One token for every running request: one batched forward (fast rows), one forward each (HF)."""
        handle = self.handle
        self.peak = max(self.peak, len(self._rows) + len(self._hf))
        if self._rows:
            batch = list(self._rows)
            with handle.lock:
                logits = self._slots.step([s.pending for s in batch])
            for seq, row in zip(batch, logits):
                self._emit_or_fail(seq, row)
        for seq in list(self._hf):
            try:
                with handle.lock:
                    out = handle.model(input_ids=torch.tensor([[seq.pending]], device=handle.device), **seq.cache,
                                       use_cache=True)
            except Exception as e:  # its own cache: the others go on
                self._release(seq)
                self._finish(seq, e)
                continue
            self._emit_or_fail(seq, out.logits[0, -1])
        self.steps += 1

    def _emit_or_fail(self, seq: _Seq, logits: torch.Tensor) -> None:
        try:
            self._emit(seq, logits, None)
        except Exception as e:  # this request's sampling failed (NaN logits ...): it ends, the batch goes on
            self._release(seq)
            self._finish(seq, e)

    def _emit(self, seq: _Seq, logits: torch.Tensor, scores) -> None:
        """Choose ``seq``'s next token from its ``[V]`` logits and send it; end the request when it is done."""
        stop_ids = self.handle.stop_ids
        last = logits.float()
        token = pick(last, seq.temperature, seq.top_p, seq.gen)
        seq.out.put((token, score_token(last, token, seq.logprobs, stop_ids), scores))
        seq.generated += 1
        if token in stop_ids or seq.generated >= seq.max_tokens:
            self._release(seq)
            self._finish(seq)
        else:
            seq.pending = token

    def _drop_cancelled(self) -> None:
        for seq in [s for s in (*self._rows, *self._hf) if s.cancelled]:
            self._release(seq)
            self._finish(seq)

    def _release(self, seq: _Seq) -> None:
        """Take ``seq`` out of the running batch (its row freed, its cache dropped)."""
        if seq.row is not None:
            moved = self._slots.remove(seq.row)
            if moved is not None:
                other = self._rows[moved]
                self._rows[seq.row], other.row = other, seq.row
            self._rows.pop()
            seq.row = None
            if not self._rows and self._slots.decoder.capacity > SHRINK_COLUMNS:
                self._slots = None  # a long request widened every row: give the memory back
        elif seq in self._hf:
            self._hf.remove(seq)
        seq.cache = None

    def _finish(self, seq: _Seq, error: BaseException | None = None) -> None:
        seq.out.put(error if error is not None else _DONE)
        with self._cv:
            self._inflight -= 1
            self.mean_seconds += 0.2 * (time.monotonic() - seq.submitted - self.mean_seconds)

    def _fail_running(self, error: BaseException) -> None:
        for seq in (*self._rows, *self._hf):
            seq.row, seq.cache = None, None
            self._finish(seq, error)
        self._rows, self._hf, self._slots = [], [], None
