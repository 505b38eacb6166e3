"""``POST /v1/chat/completions``: the request checks and the answer (one JSON object, or server-sent events).

A request: ``messages`` (roles system / user / assistant, text content or text parts), ``max_tokens`` (or
``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop``, ``n`` (1), ``stream`` with
``stream_options.include_usage``, ``logprobs`` / ``top_logprobs`` (OpenAI's chat format, streamed too), ``user``.
Every other parameter is refused with 400 naming it, or accepted only at the value that changes nothing
(``CHAT_NEUTRAL``).
"""

from __future__ import annotations

import json

from lmdistill.decoding import ChatEngine
from lmdistill.serve.api_errors import ApiError
from lmdistill.serve.params import FLOOR, NEUTRAL, check_model, check_seed, check_supported, number, stop_strings

ROLES = ("system", "user", "assistant")

# chat parameters accepted only at the value that changes nothing (the completions ones, and these)
CHAT_NEUTRAL = {**{k: v for k, v in NEUTRAL.items() if k not in ("best_of", "suffix")},
                "response_format": ({"type": "text"},), "tools": ([],), "functions": ([],),
                "tool_choice": ("none", "auto"), "function_call": ("none", "auto")}
CHAT_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "n", "stream", "stream_options", "seed",
              "stop", "temperature", "top_p", "logprobs", "top_logprobs", "user", *CHAT_NEUTRAL}


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


def _check_params(body: dict) -> None:
    """400 naming the first parameter this server does not implement (unknown, or at a value that matters)."""
    check_supported(body, CHAT_KNOWN, CHAT_NEUTRAL)
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
    top = number(body, "top_logprobs", None, 0, max_logprobs, integer=True)
    if top is not None and not flag:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    return (top or 0) if flag else None


def _messages(body: dict) -> list[dict]:
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
    return clean


def parse_request(body, *, model_name: str, max_tokens_limit: int, default_max_tokens: int,
                  max_logprobs: int = 20) -> dict:
    """Validate a chat-completions body; return normalised parameters or raise ``ApiError``."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_params(body)
    clean = _messages(body)
    model = check_model(body, model_name)
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, limit_name, default_max_tokens, 1, max_tokens_limit, integer=True)
    n = number(body, "n", 1, 1, 1, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    seed = check_seed(body)
    stop = stop_strings(body)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    return {
        "messages": clean, "model": model, "max_tokens": max_tokens, "n": n, "stream": stream, "seed": seed,
        "stop": stop, "include_usage": bool(opts.get("include_usage")), "logprobs": _logprobs(body, max_logprobs),
        "temperature": float(number(body, "temperature", 1.0, 0.0, 2.0)),
        "top_p": float(number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
    }


def logprobs_content(engine: ChatEngine, scores, k: int) -> list[dict]:
    """OpenAI's chat ``logprobs.content``: per generated token its text, log-probability, bytes and top ``k``."""

    def entry(token: int, lp: float) -> dict:
        return {"token": engine.piece(token), "logprob": max(float(lp), FLOOR), "bytes": engine.token_bytes(token)}

    return [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top[:k]]} for s in scores]


def usage(done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def answer(engine: ChatEngine, done, req: dict, cid: str, now: int, model_name: str) -> dict:
    """The ``chat.completion`` object of a finished ``Completion``."""
    logprobs = None
    if req["logprobs"] is not None:
        logprobs = {"content": logprobs_content(engine, done.logprobs or [], req["logprobs"]), "refusal": None}
    return {"id": cid, "object": "chat.completion", "created": now, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "logprobs": logprobs, "finish_reason": done.finish_reason}],
            "usage": usage(done)}


def sse(engine: ChatEngine, stream, scores: list | None, req: dict, cid: str, now: int, model_name: str):
    """Server-sent events in OpenAI's chunk format (a sync generator: Starlette iterates it in a thread).

    With ``logprobs`` each chunk carries the scores of the tokens generated since the previous one; tokens whose
    text is never sent (held back, or cut at a stop string) ride on the last chunk, so the chunks' scores, joined,
    are the non-streaming answer's."""
    k = req["logprobs"]
    sent = 0

    def chunk(delta: dict, finish=None, totals=None) -> str:
        nonlocal sent
        logprobs = None
        if k is not None and totals is None:
            logprobs = {"content": logprobs_content(engine, scores[sent:], k), "refusal": None}
            sent = len(scores)
        obj = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
               "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if totals is not None:
            obj = {**obj, "choices": [], "usage": totals}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    final = None
    for delta, done in stream:
        if delta:
            yield chunk({"content": delta})
        final = done or final
    yield chunk({}, finish=final.finish_reason)
    if req["include_usage"]:
        yield chunk({}, totals=usage(final))
    yield "data: [DONE]\n\n"
