"""Reading a request body under a size limit, and its JSON.

A body over the limit is refused (413) while it is read, whether it declares a ``Content-Length`` or comes
chunked, and its rest is read and dropped (``drain``) so the client sees the 413 rather than a reset connection.
The limit is sized to the model's context by default (``default_max_body_bytes``). The JSON is parsed in a
worker thread by the caller; a string holding a lone UTF-16 surrogate is a 400 (``loads``).
"""

from __future__ import annotations

import json

from lmdistill.decoding.handle import max_positions
from lmdistill.serve.api_errors import ApiError

MAX_BODY_BYTES = 8 * 1024 * 1024  # the body limit for a model that does not say its context length
BODY_BYTES_PER_TOKEN = 16  # JSON-escaped text of one token: a few characters, up to 6 bytes each (\\uXXXX)
MIN_BODY_BYTES = 1024 * 1024
DRAIN_BYTES = 256 * 1024 * 1024  # past the limit, read and drop at most this much more before closing


def default_max_body_bytes(model) -> int:
    """The request-body limit sized to ``model``'s context: ``BODY_BYTES_PER_TOKEN`` per position, at least
    ``MIN_BODY_BYTES`` (``MAX_BODY_BYTES`` when the model does not say its context length)."""
    positions = max_positions(model)
    return MAX_BODY_BYTES if positions is None else max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * positions)


async def read_body(request, limit: int) -> bytes:
    """The body, read chunk by chunk and refused (413) as soon as it is over ``limit``, declared or not."""
    too_large = f"the request body is larger than this server's limit of {limit} bytes"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, too_large, code="request_too_large")
    buf = bytearray()
    request.scope["lmdistill.body_started"] = True  # uvicorn answers 100-continue on the first read
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, too_large, code="request_too_large")
    return bytes(buf)


async def drain(request) -> None:
    """Read and drop the rest of a refused body (at most ``DRAIN_BYTES``): a client still sending when the
    server closes gets a reset connection instead of the answer. A client waiting on ``Expect:
    100-continue`` is answered at once (reading would tell it to send)."""
    from starlette.requests import ClientDisconnect

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


def loads(raw: bytes):
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
