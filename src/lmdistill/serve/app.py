"""An OpenAI-compatible chat server for a local model (FastAPI).

``create_app(model, tokenizer, model_name=..., api_key=..., max_tokens_limit=...)`` builds the app:
``GET /v1/models``, ``POST /v1/chat/completions`` (plain JSON, or server-sent events with ``stream: true``
ending in ``data: [DONE]``). Every failure is answered with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``: 401 for a missing or wrong key, 400 for a malformed
request, 404 for an unknown model or route; never a 500 for bad input.
"""


import hmac
import json
import time
import uuid

from lmdistill.serve.engine import ChatEngine, ContextLengthError

ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
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


def parse_request(body, *, model_name: str, max_tokens_limit: int, default_max_tokens: int) -> dict:
    """Validate a chat-completions body; return normalised parameters or raise ``ApiError``."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
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
    model = body.get("model", model_name)
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
    if model != model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{model_name}'", param="model",
                       code="model_not_found")
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, limit_name, default_max_tokens, 1, max_tokens_limit, integer=True)
    n = _number(body, "n", 1, 1, 1, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer", param="seed", code="invalid_type")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", param="stop", code="invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    return {
        "messages": clean, "model": model, "max_tokens": max_tokens, "n": n, "stream": stream, "seed": seed,
        "stop": stop, "include_usage": bool(opts.get("include_usage")),
        "temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        "top_p": float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
    }


MAX_BODY_BYTES = 8 * 1024 * 1024


def create_app(model, tokenizer, *, model_name: str = "local", api_key: str | None = None,
               max_tokens_limit: int = 2048, default_max_tokens: int = 256, truncate_prompt: bool = False,
               max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI app serving ``model``. Forward passes are serialised on the model by the engine's lock."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    engine = ChatEngine(model, tokenizer, truncate_prompt=truncate_prompt)
    app = FastAPI(title="lmdistill serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    created = int(time.time())

    def error_response(err: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(413, f"the request body is larger than {max_body_bytes} bytes", code="request_too_large")
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise ApiError(413, f"the request body is larger than {max_body_bytes} bytes", code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        req = parse_request(body, model_name=model_name, max_tokens_limit=max_tokens_limit,
                            default_max_tokens=default_max_tokens)
        gen_kwargs = {k: req[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop")}
        try:  # fail early (400) on an over-long prompt, before a stream has started
            engine.prompt_ids(req["messages"], req["max_tokens"])
        except ContextLengthError as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if req["stream"]:
            return StreamingResponse(_sse(engine, req, gen_kwargs, cid, now, model_name),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        from starlette.concurrency import run_in_threadpool

        done = await run_in_threadpool(engine.complete, req["messages"], **gen_kwargs)
        return {
            "id": cid, "object": "chat.completion", "created": now, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "logprobs": None, "finish_reason": done.finish_reason}],
            "usage": _usage(done),
        }

    return app


def _usage(done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _sse(engine: ChatEngine, req: dict, gen_kwargs: dict, cid: str, now: int, model_name: str):
    """Server-sent events in OpenAI's chunk format (a sync generator: Starlette iterates it in a thread)."""
    def chunk(delta: dict, finish=None, usage=None) -> str:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if usage is not None:
            obj = {**obj, "choices": [], "usage": usage}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    final = None
    for delta, done in engine.stream(req["messages"], **gen_kwargs):
        if delta:
            yield chunk({"content": delta})
        final = done or final
    yield chunk({}, finish=final.finish_reason)
    if req["include_usage"]:
        yield chunk({}, usage=_usage(final))
    yield "data: [DONE]\n\n"
