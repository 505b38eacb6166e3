"""The request-parameter checks both endpoints share: numbers in range, booleans, ``stop``, ``seed``, ``model``,
and parameters this server does not implement.

Each check returns the normalised value or raises ``ApiError`` 400 naming the parameter (404 for another model
than the one served). A parameter that would change the answer and is not implemented is refused, never
ignored; the ones in ``NEUTRAL`` are accepted only at the value that changes nothing.
"""

from __future__ import annotations

import json

from lmdistill.serve.api_errors import ApiError

# parameters accepted only at the value that changes nothing
NEUTRAL = {"best_of": (1,), "suffix": ("",), "logit_bias": ({},), "presence_penalty": (0,), "frequency_penalty": (0,),
           "top_k": (-1, 0), "min_p": (0,), "repetition_penalty": (1,), "min_tokens": (0,)}
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)   # what torch.Generator.manual_seed takes
FLOOR = -9999.0  # the log-probability answers send for -inf (JSON has no infinity), as OpenAI and vLLM do


def number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
    """``body[name]`` (``default`` when absent or null) if a number (an integer with ``integer``) in ``[lo, hi]``
    (``(lo, hi]`` with ``lo_open``)."""
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


def flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be a boolean", param=name, code="invalid_type")
    return value


def stop_strings(body: dict) -> list[str] | None:
    """``stop``: a string or a list of at most 4 strings (``None`` when absent)."""
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", param="stop", code="invalid_type")
    return stop


def check_supported(body: dict, known, neutral: dict) -> None:
    """400 naming the first parameter not in ``known``, or one of ``neutral`` (accepted only at values that change
    nothing here) at another value."""
    for name in body:
        if name not in known:
            raise ApiError(400, f"unsupported parameter '{name}'", param=name, code="unsupported_parameter")
    for name, allowed in neutral.items():
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or value not in allowed):
            raise ApiError(400, f"'{name}' = {json.dumps(value)[:80]} is not supported by this server", param=name,
                           code="unsupported_parameter")


def check_model(body: dict, model_name: str) -> str:
    """The request's ``model`` (default: the served one); 400 if not a string, 404 if another model."""
    model = body.get("model", model_name)
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
    if model != model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{model_name}'", param="model",
                       code="model_not_found")
    return model


def check_seed(body: dict) -> int | None:
    """The request's ``seed`` (None when absent); 400 unless an integer torch can seed with."""
    seed = body.get("seed")
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)   # 3.0 is an integer to JSON
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer", param="seed", code="invalid_type")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ApiError(400, f"'seed' must be >= -2**63 and <= 2**64 - 1, got {seed}", param="seed",
                       code="invalid_value")
    return seed
