"""JSON Schemas of the request bodies, for the app's OpenAPI document (``GET /openapi.json``).

The endpoints read their bodies themselves (``context.ServeContext.read_json``: a size bound first, then the
checks of ``chat.parse_request`` / ``completions.parse_completion_request``), so FastAPI cannot derive a schema;
these describe what those checks accept, with the server's limits, so a client or a fuzzer (schemathesis) can
build valid and invalid requests from the document. The checks remain the authority: a body the schema allows may still be refused with a
400 the schema cannot express (a prompt longer than the context, ``top_logprobs`` without ``logprobs``).
"""

from __future__ import annotations

from lmdistill.serve.params import NEUTRAL, SEED_RANGE

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

_STOP = {"anyOf": [{"type": "string"}, {"type": "array", "maxItems": 4, "items": {"type": "string"}}]}
_SEED = {"type": "integer", "minimum": SEED_RANGE[0], "maximum": SEED_RANGE[1]}
_STREAM_OPTIONS = {"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                   "additionalProperties": False}


def _neutral(allowed: dict) -> dict:
    """Parameters accepted only at the values that change nothing."""
    return {name: {"enum": list(values)} for name, values in allowed.items()}


def chat_request_schema(*, max_tokens_limit: int, max_logprobs: int, neutral: dict) -> dict:
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"],
               "properties": {"role": {"enum": ["system", "user", "assistant"]},
                              "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]}}}
    tokens = {"type": "integer", "minimum": 1, "maximum": max_tokens_limit}
    return {"type": "object", "required": ["messages"], "additionalProperties": False, "properties": {
        "model": {"type": "string"}, "messages": {"type": "array", "minItems": 1, "items": message},
        "max_tokens": tokens, "max_completion_tokens": tokens, "n": {"type": "integer", "minimum": 1, "maximum": 1},
        "stream": {"type": "boolean"}, "stream_options": _STREAM_OPTIONS, "seed": _SEED, "stop": _STOP,
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "logprobs": {"type": "boolean"}, "top_logprobs": {"type": "integer", "minimum": 0, "maximum": max_logprobs},
        "user": {"type": "string"}, **_neutral(neutral)}}


def completion_request_schema(*, max_tokens_limit: int, max_logprobs: int, vocab: int, max_batch: int) -> dict:
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1}}
    one = {"anyOf": [{"type": "string"}, ids]}
    k = {"type": "integer", "minimum": 0, "maximum": max_logprobs}
    return {"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
        "model": {"type": "string"},
        "prompt": {"anyOf": [one, {"type": "array", "minItems": 1, "maxItems": max_batch, "items": one}]},
        "max_tokens": {"type": "integer", "minimum": 0, "maximum": max_tokens_limit},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "n": {"type": "integer", "minimum": 1, "maximum": 1},
        "stream": {"enum": [False]}, "stream_options": _STREAM_OPTIONS, "logprobs": k, "echo": {"type": "boolean"},
        "stop": _STOP, "seed": _SEED, "user": {"type": "string"}, "prompt_logprobs": k,
        "return_tokens_as_token_ids": {"type": "boolean"}, "add_special_tokens": {"type": "boolean"},
        **_neutral(NEUTRAL)}}


def operation(body_schema: dict, *, authenticated: bool) -> dict:
    """``openapi_extra`` of a JSON-body endpoint: its request body and its error answers."""
    error = {"content": {"application/json": {"schema": ERROR}}}
    responses = {"400": {"description": "a malformed or unsupported request", **error},
                 "404": {"description": "another model than the one served", **error},
                 "413": {"description": "a body over the server's limit", **error}}
    if authenticated:
        responses["401"] = {"description": "a missing or wrong API key", **error}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}},
            "responses": responses}
