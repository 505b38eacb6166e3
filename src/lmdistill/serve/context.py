"""What every endpoint of one app shares: its engine and settings, and the steps each request goes through.

A ``ServeContext`` is built once by ``create_app`` and handed to the routers. A request's path: ``read_json``
(the API key, the body under its size limit, its JSON parsed in a worker thread), the endpoint's own checks,
``refuse_if_full`` (a request that will find the batch and its queue full is answered 429 at once, before its
prompt is tokenized), then ``generate`` / ``stream`` (the blocking engine call in a worker thread). Batched
requests wait for their tokens on worker threads of their own budget (one per request the batcher can hold), so
a full batch and queue never starve JSON parsing and tokenization of the default pool, and ``/health`` and
small requests are answered during a burst of big ones.
"""

from __future__ import annotations

import functools
import hmac
import time
from dataclasses import dataclass, field

from lmdistill.decoding import ChatEngine, QueueFull
from lmdistill.serve.api_errors import ApiError
from lmdistill.serve.body import drain, loads, read_body


@dataclass
class ServeContext:
    engine: ChatEngine
    model_name: str
    api_key: str | None
    max_tokens_limit: int
    default_max_tokens: int
    max_logprobs: int
    max_batch_prompts: int
    truncate_prompt: bool
    max_body_bytes: int
    created: int = field(default_factory=lambda: int(time.time()))
    limiter: object = field(default=None, init=False)  # batched requests' worker threads (None: the default pool)

    def __post_init__(self) -> None:
        if self.engine.batcher is not None:
            import anyio

            self.limiter = anyio.CapacityLimiter(self.engine.batcher.limit + 8)

    def check_key(self, request) -> None:
        """401 unless the request carries the API key as a bearer token (compared in constant time)."""
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    async def read_json(self, request):
        """The key checked, the body read under the limit (a refused body drained), its JSON parsed off the loop."""
        from starlette.concurrency import run_in_threadpool

        try:
            self.check_key(request)
            raw = await read_body(request, self.max_body_bytes)
        except ApiError:
            await drain(request)
            raise
        try:
            return await run_in_threadpool(loads, raw)
        except RecursionError:
            raise ApiError(400, "the request body is not valid JSON (nested too deeply)") from None
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None

    def busy(self, err: QueueFull | None = None) -> ApiError:
        """429 with ``Retry-After``: the batch and its queue are full (OpenAI's rate-limit error body)."""
        batcher = self.engine.batcher
        message = str(err) if err is not None else (
            f"the server is busy: {batcher.inflight} requests are running or waiting (at most {batcher.max_batch} "
            f"run at once and {batcher.max_queue} wait); retry later")
        retry = err.retry_after if err is not None else batcher.retry_after()
        return ApiError(429, message, type="requests", code="rate_limit_exceeded",
                        headers={"Retry-After": str(retry)})

    def refuse_if_full(self) -> None:
        """Before any tokenizing: a request that will find the queue full is answered at once."""
        if self.engine.batcher is not None and self.engine.batcher.full():
            raise self.busy()

    async def generate(self, fn, *args, **kwargs):
        """``fn`` (a blocking engine call) in a worker thread: batched ones on their own limiter."""
        from starlette.concurrency import run_in_threadpool

        try:
            if self.limiter is None:
                return await run_in_threadpool(fn, *args, **kwargs)
            import anyio

            return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self.limiter)
        except QueueFull as e:
            raise self.busy(e) from None

    def stream(self, events):
        """A server-sent-events response of the sync generator ``events`` (batched: driven on the limiter)."""
        from fastapi.responses import StreamingResponse

        body = events if self.limiter is None else _drive(events, self.limiter)
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _drive(events, limiter):
    """Iterate the sync generator ``events`` one item per worker-thread call on ``limiter``. When the response
    ends early (the client gone) the generator is closed, which takes its request out of the batch."""
    import anyio

    try:
        while True:
            item = await anyio.to_thread.run_sync(next, events, None, limiter=limiter)
            if item is None:
                return
            yield item
    finally:
        try:
            events.close()
        except ValueError:  # still running in its thread (cannot happen: the thread call is not abandoned)
            pass
