"""Scripted OpenAI-compatible servers for tests and dry runs: real HTTP, deterministic answers, faults.

``scripted_app(respond, fault=...)`` answers ``/v1/chat/completions`` with ``respond(messages, body)``.
``fault(n, body)`` may inject a failure for the n-th request (counting from 0): an HTTP status (``429``,
``500``, ``503`` ...), ``(status, message[, code])``, ``("hang", seconds)`` to stall past the client's timeout,
or ``None``. Every
request is logged in ``app.state.calls`` (with its outcome), so tests can check nothing was asked twice.
"""

import asyncio
import json
import threading
import time
import uuid
from typing import Callable


def scripted_app(respond: Callable[[list, dict], str], *, model_name: str = "scripted",
                 fault: Callable[[int, dict], object] | None = None, api_key: str | None = None):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.calls = []
    lock = threading.Lock()

    def err(status: int, message: str, code=None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "server_error" if status >= 500 else
                                       "invalid_request_error", "param": None, "code": code}}, status_code=status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "scripted"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return err(401, "bad key", "invalid_api_key")
        body = json.loads(await request.body())
        with lock:
            n = len(app.state.calls)
            entry = {"n": n, "messages": body.get("messages"), "params": {k: v for k, v in body.items()
                                                                          if k != "messages"}, "outcome": None}
            app.state.calls.append(entry)
        action = fault(n, body) if fault else None
        if isinstance(action, int):
            entry["outcome"] = action
            headers = {"retry-after": "0"} if action == 429 else None
            r = err(action, f"injected {action}")
            if headers:
                r.headers.update(headers)
            return r
        if isinstance(action, tuple) and isinstance(action[0], int):
            entry["outcome"] = action[0]
            return err(action[0], action[1], *action[2:])
        if isinstance(action, tuple) and action[0] == "hang":
            entry["outcome"] = "hang"
            await asyncio.sleep(action[1])
        text = respond(body["messages"], body)
        if entry["outcome"] is None:
            entry["outcome"] = "ok"
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                  "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

    return app
