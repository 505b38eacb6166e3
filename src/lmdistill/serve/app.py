"""An OpenAI-compatible chat server for a local model (FastAPI).

``create_app(model, tokenizer, model_name=..., api_key=..., max_tokens_limit=...)`` builds the app:
``GET /v1/models``, ``POST /v1/chat/completions`` (plain JSON, or server-sent events with ``stream: true``
ending in ``data: [DONE]``), ``POST /v1/completions`` (raw prompts or token ids, ``echo``, ``logprobs`` and
vLLM's ``prompt_logprobs``: see ``lmdistill.serve.completions``), ``GET /openapi.json`` (the request bodies'
JSON Schemas with this server's limits: ``lmdistill.serve.openapi``; no key needed). Every failure is answered
with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``: 401 for a missing or wrong key, 400
for a malformed request, 404 for an unknown model or route, 413 for a body over ``max_body_bytes``, 429 with
``Retry-After`` when the batch and its queue are full; never a 500 for bad input.

Concurrent requests decode together (``max_batch_size``, continuous batching: ``lmdistill.serve.batcher``); at
most ``max_queue`` more wait for a place, and a request past that is refused at once (before its prompt is
tokenized when the queue is already full). A streamed request is queued before its response starts, so a full
queue is a 429, never a broken stream; a client that hangs up takes its request out of the batch.

The server bounds itself: a body over the limit is refused while it is read (whether it declares a
``Content-Length`` or comes chunked), its rest read and dropped so the client sees the 413 rather than a reset
connection; a prompt with more characters than the context can hold is refused before it is tokenized
(``ChatEngine.encode``); JSON parsing, tokenization and generation run in worker threads, off the event loop,
so ``/health`` and small requests are answered during a burst of big ones. Every chat parameter is honoured
(``logprobs`` / ``top_logprobs`` in OpenAI's chat format, streamed too) or refused with 400 naming it.
"""


import functools
import hmac
import json
import time
import uuid

from lmdistill import __version__
from lmdistill.serve.completions import (NEUTRAL, check_model, check_seed, check_supported, completion_choice,
                                         engine_kwargs, parse_completion_request)
from lmdistill.serve.batcher import QueueFull
from lmdistill.serve.engine import ChatEngine, ContextLengthError
from lmdistill.serve.openapi import chat_request_schema, completion_request_schema, operation

ROLES = ("system", "user", "assistant")
DEFAULT_MAX_BATCH = 16  # requests decoded together
DEFAULT_MAX_QUEUE = 64  # requests waiting for a place in the batch before 429


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)   # 3.0 is an integer to JSON (and JSON Schema): accepted as 3
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int))
            or value != value):   # NaN (json.loads reads it) passes every comparison below
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind}, got {json.dumps(value)}", param=name, code="invalid_type")
    if value > hi or value < lo or (lo_open and value == lo):
        raise ApiError(400, f"'{name}' must be {'>' if lo_open else '>='} {lo} and <= {hi}, got {value}", param=name,
                       code="invalid_value")
    return value


def _content(m: dict, i: int) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}]")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}]",
                   code="invalid_type")


# chat parameters accepted only at the value that changes nothing (the completions ones, and these)
CHAT_NEUTRAL = {**{k: v for k, v in NEUTRAL.items() if k not in ("best_of", "suffix")},
                "response_format": ({"type": "text"},), "tools": ([],), "functions": ([],),
                "tool_choice": ("none", "auto"), "function_call": ("none", "auto")}
CHAT_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "n", "stream", "stream_options", "seed",
              "stop", "temperature", "top_p", "logprobs", "top_logprobs", "user", *CHAT_NEUTRAL}


def _check_params(body: dict) -> None:
    """400 naming the first parameter this server does not implement (unknown, or at a value that matters)."""
    check_supported(body, CHAT_KNOWN, CHAT_NEUTRAL, ApiError)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, "'user' must be a string", param="user", code="invalid_type")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
        for key in opts:
            if key != "include_usage":
                raise ApiError(400, f"unsupported parameter 'stream_options.{key}'", param=f"stream_options.{key}",
                               code="unsupported_parameter")


def _logprobs(body: dict, max_logprobs: int) -> int | None:
    """``top_logprobs`` (0 when absent) if ``logprobs`` is true, else ``None``; 400 for anything inconsistent."""
    flag = body.get("logprobs")
    if flag is not None and not isinstance(flag, bool):
        raise ApiError(400, "'logprobs' must be a boolean", param="logprobs", code="invalid_type")
    top = _number(body, "top_logprobs", None, 0, max_logprobs, integer=True)
    if top is not None and not flag:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    return (top or 0) if flag else None


def parse_request(body, *, model_name: str, max_tokens_limit: int, default_max_tokens: int,
                  max_logprobs: int = 20) -> dict:
    """Validate a chat-completions body; return normalised parameters or raise ``ApiError``."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_params(body)
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is a required property", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages", code="invalid_type")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]", code="invalid_type")
        if m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", param=f"messages[{i}].role",
                           code="invalid_value")
        clean.append({"role": m["role"], "content": _content(m, i)})
    model = check_model(body, model_name, ApiError)
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, limit_name, default_max_tokens, 1, max_tokens_limit, integer=True)
    n = _number(body, "n", 1, 1, 1, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    seed = check_seed(body, ApiError)
    stop = _stop(body)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    return {
        "messages": clean, "model": model, "max_tokens": max_tokens, "n": n, "stream": stream, "seed": seed,
        "stop": stop, "include_usage": bool(opts.get("include_usage")), "logprobs": _logprobs(body, max_logprobs),
        "temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        "top_p": float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
    }


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", param="stop", code="invalid_type")
    return stop


MAX_BODY_BYTES = 8 * 1024 * 1024  # the body limit for a model that does not say its context length
BODY_BYTES_PER_TOKEN = 16  # JSON-escaped text of one token: a few characters, up to 6 bytes each (\\uXXXX)
MIN_BODY_BYTES = 1024 * 1024
DRAIN_BYTES = 256 * 1024 * 1024  # past the limit, read and drop at most this much more before closing


def default_max_body_bytes(model) -> int:
    """The request-body limit sized to ``model``'s context: ``BODY_BYTES_PER_TOKEN`` per position, at least
    ``MIN_BODY_BYTES`` (``MAX_BODY_BYTES`` when the model does not say its context length)."""
    from lmdistill.serve.engine import _max_positions

    positions = _max_positions(model)
    return MAX_BODY_BYTES if positions is None else max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * positions)


def _logprobs_content(engine: ChatEngine, scores, k: int) -> list[dict]:
    """OpenAI's chat ``logprobs.content``: per generated token its text, log-probability, bytes and top ``k``."""
    from lmdistill.serve.completions import FLOOR

    def entry(token: int, lp: float) -> dict:
        return {"token": engine.piece(token), "logprob": max(float(lp), FLOOR), "bytes": engine.token_bytes(token)}

    return [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top[:k]]} for s in scores]


def create_app(model, tokenizer, *, model_name: str = "local", api_key: str | None = None,
               max_tokens_limit: int = 2048, default_max_tokens: int = 256, truncate_prompt: bool = False,
               max_body_bytes: int | None = None, max_logprobs: int = 20, max_batch_prompts: int = 64,
               max_batch_size: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE):
    """The FastAPI app serving ``model``. Forward passes are serialised on the model by the engine's lock.

    ``max_batch_size``: how many requests decode together (continuous batching, ``lmdistill.serve.batcher``;
    0: none, each request decodes alone and concurrent ones take turns token by token); ``max_queue``: how many
    more may wait for a place in the batch; past that a request is answered 429 with ``Retry-After``.

    ``max_body_bytes``: the largest request body (413 past it; default ``default_max_body_bytes(model)``);
    ``max_logprobs``: the largest ``logprobs`` / ``prompt_logprobs`` a completions request, or ``top_logprobs``
    a chat request, may ask for (vLLM's ``--max-logprobs``); ``max_batch_prompts``: the most prompts one
    completions request may hold.
    """
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    engine = ChatEngine(model, tokenizer, truncate_prompt=truncate_prompt, max_batch_size=max_batch_size or None,
                        max_queue=max_queue)
    # batched requests wait for their tokens in worker threads of their own budget (one per request the batcher
    # can hold), so a full batch and queue never starve JSON parsing and tokenization of the default pool
    limiter = None
    if engine.batcher is not None:
        import anyio

        limiter = anyio.CapacityLimiter(engine.batcher.limit + 8)
    if max_body_bytes is None:
        max_body_bytes = default_max_body_bytes(model)
    # GET /openapi.json describes the request bodies (lmdistill.serve.openapi): clients and fuzzers build on it
    app = FastAPI(title="lmdistill serve", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.engine = engine
    app.state.max_body_bytes = max_body_bytes
    created = int(time.time())

    def error_response(err: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        if err.status == 413:
            headers = {"Connection": "close"}
        if err.headers:
            headers = {**(headers or {}), **err.headers}
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        _forget_frames(exc)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(ApiError(400, str(exc.errors()[:1])))

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "lmdistill"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    too_large = f"the request body is larger than this server's limit of {max_body_bytes} bytes"

    async def read_body(request: Request) -> bytes:
        """The body, read chunk by chunk and refused (413) as soon as it is over the limit, declared or not."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(413, too_large, code="request_too_large")
        buf = bytearray()
        request.scope["lmdistill.body_started"] = True  # uvicorn answers 100-continue on the first read
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > max_body_bytes:
                raise ApiError(413, too_large, code="request_too_large")
        return bytes(buf)

    async def drain(request: Request) -> None:
        """Read and drop the rest of a refused body (at most ``DRAIN_BYTES``): a client still sending when the
        server closes gets a reset connection instead of the answer. A client waiting on ``Expect:
        100-continue`` is answered at once (reading would tell it to send)."""
        if "100-continue" in request.headers.get("expect", "").lower() and not request.scope.get("lmdistill.body_started"):
            return
        dropped = 0
        try:
            async for chunk in request.stream():
                dropped += len(chunk)
                if dropped > DRAIN_BYTES:
                    return
        except (ClientDisconnect, RuntimeError):  # gone, or the body was already read to its end
            return

    async def read_json(request: Request):
        try:
            check_key(request)
            raw = await read_body(request)
        except ApiError:
            await drain(request)
            raise
        try:
            return await run_in_threadpool(_loads, raw)
        except RecursionError:
            raise ApiError(400, "the request body is not valid JSON (nested too deeply)") from None
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None

    limits = {"max_tokens_limit": max_tokens_limit, "max_logprobs": max_logprobs}
    chat_doc = operation(chat_request_schema(**limits, neutral=CHAT_NEUTRAL), authenticated=api_key is not None)
    completions_doc = operation(completion_request_schema(**limits, vocab=engine.vocab_rows,
                                                          max_batch=max_batch_prompts),
                                authenticated=api_key is not None)

    def busy(err: QueueFull | None = None) -> ApiError:
        """429 with ``Retry-After``: the batch and its queue are full (OpenAI's rate-limit error body)."""
        batcher = engine.batcher
        message = str(err) if err is not None else (
            f"the server is busy: {batcher.inflight} requests are running or waiting (at most {batcher.max_batch} "
            f"run at once and {batcher.max_queue} wait); retry later")
        retry = err.retry_after if err is not None else batcher.retry_after()
        return ApiError(429, message, type="requests", code="rate_limit_exceeded",
                        headers={"Retry-After": str(retry)})

    def refuse_if_full() -> None:
        """Before any tokenizing: a request that will find the queue full is answered at once."""
        if engine.batcher is not None and engine.batcher.full():
            raise busy()

    async def generate(fn, *args, **kwargs):
        """``fn`` (a blocking engine call) in a worker thread: batched ones on their own limiter."""
        try:
            if limiter is None:
                return await run_in_threadpool(fn, *args, **kwargs)
            import anyio

            return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=limiter)
        except QueueFull as e:
            raise busy(e) from None

    @app.post("/v1/chat/completions", openapi_extra=chat_doc)
    async def chat_completions(request: Request):
        body = await read_json(request)
        req = parse_request(body, model_name=model_name, max_tokens_limit=max_tokens_limit,
                            default_max_tokens=default_max_tokens, max_logprobs=max_logprobs)
        gen_kwargs = {k: req[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop", "logprobs")}
        refuse_if_full()
        try:  # fail early (400) on an over-long prompt, before a stream has started; tokenized in a worker
            ids = await run_in_threadpool(engine.prompt_ids, req["messages"], req["max_tokens"])
        except ContextLengthError as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if req["stream"]:
            scores = [] if req["logprobs"] is not None else None
            try:  # batched: queued now, so a full queue is a 429, not a stream that fails
                stream = engine.stream_ids(ids, **gen_kwargs, scores_out=scores)
            except QueueFull as e:
                raise busy(e) from None
            events = _sse(engine, stream, scores, req, cid, now, model_name)
            return StreamingResponse(events if limiter is None else _drive(events, limiter),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        done = await generate(engine.complete_ids, ids, **gen_kwargs)
        logprobs = None
        if req["logprobs"] is not None:
            logprobs = {"content": _logprobs_content(engine, done.logprobs or [], req["logprobs"]), "refusal": None}
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": now, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "logprobs": logprobs, "finish_reason": done.finish_reason}],
            "usage": _usage(done),
        })

    @app.post("/v1/completions", openapi_extra=completions_doc)
    async def completions(request: Request):
        body = await read_json(request)
        refuse_if_full()
        # in a worker: string prompts are tokenized here (after the cheap length bound)
        req = await run_in_threadpool(lambda: parse_completion_request(
            body, engine=engine, model_name=model_name, max_tokens_limit=max_tokens_limit, max_logprobs=max_logprobs,
            max_batch=max_batch_prompts, number=_number, stop_param=_stop, error=ApiError,
            truncate_prompt=truncate_prompt))
        kwargs = engine_kwargs(req)
        # scores must cover the prompt as sent: only plain generation may cut an over-long prompt
        truncate = req["truncate"]
        prompts = []
        for i, (ids, text) in enumerate(req["prompts"]):
            try:
                fitted = engine.fit(ids, req["max_tokens"], truncate=truncate,
                                    what=f"prompt[{i}] uses" if len(req["prompts"]) > 1 else "the prompt uses")
            except ContextLengthError as e:
                raise ApiError(400, str(e), param="prompt", code="context_length_exceeded") from None
            prompts.append((fitted, text if fitted is ids else None))

        # batched: all the prompts join the batch together
        done = await generate(engine.complete_many_ids, [ids for ids, _ in prompts], **kwargs)
        choices = [completion_choice(engine, i, ids, text, d, req)
                   for i, ((ids, text), d) in enumerate(zip(prompts, done))]
        prompt_tokens = sum(d.prompt_tokens for d in done)
        completion_tokens = sum(d.completion_tokens for d in done)
        # a JSONResponse as is: FastAPI's encoder walking megabytes of nested logprobs costs more than the forward
        return JSONResponse({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                             "created": int(time.time()), "model": model_name, "choices": choices,
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens}})

    return app


def _loads(raw: bytes):
    """The request body's JSON value. A string holding a lone UTF-16 surrogate (a ``\\ud800`` escape without its
    pair: valid JSON, but no text a tokenizer can read) is a 400."""
    value = json.loads(raw)
    if b"\\ud" in raw or b"\\uD" in raw:   # a surrogate can only come from an escape (raw UTF-8 refuses them)
        _check_unicode(value)
    return value


def _check_unicode(value) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "the request body holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                               "escape); strings must be valid Unicode", code="invalid_value") from None
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


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


def _forget_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames an error (and the errors it was raised from) went through.

    An error raised in a worker thread reaches the handler through an asyncio future, and the future, the
    error and its traceback form a reference cycle that keeps every frame's locals (a refused request's
    megabytes of body, messages and rendered prompt) alive until the cyclic garbage collector runs, which
    can be never soon: ten refused 5 MB prompts held ~170 MB that way. Clearing the frames frees them now.
    """
    import traceback

    seen = 0
    while exc is not None and seen < 8:
        traceback.clear_frames(exc.__traceback__)
        exc, seen = exc.__cause__ or exc.__context__, seen + 1


def _usage(done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _sse(engine: ChatEngine, stream, scores: list | None, req: dict, cid: str, now: int, model_name: str):
    """Server-sent events in OpenAI's chunk format (a sync generator: Starlette iterates it in a thread).

    With ``logprobs`` each chunk carries the scores of the tokens generated since the previous one; tokens whose
    text is never sent (held back, or cut at a stop string) ride on the last chunk, so the chunks' scores, joined,
    are the non-streaming answer's."""
    k = req["logprobs"]
    sent = 0

    def chunk(delta: dict, finish=None, usage=None) -> str:
        nonlocal sent
        logprobs = None
        if k is not None and usage is None:
            logprobs = {"content": _logprobs_content(engine, scores[sent:], k), "refusal": None}
            sent = len(scores)
        obj = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
               "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if usage is not None:
            obj = {**obj, "choices": [], "usage": usage}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    final = None
    for delta, done in stream:
        if delta:
            yield chunk({"content": delta})
        final = done or final
    yield chunk({}, finish=final.finish_reason)
    if req["include_usage"]:
        yield chunk({}, usage=_usage(final))
    yield "data: [DONE]\n\n"
