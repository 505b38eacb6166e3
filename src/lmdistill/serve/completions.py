"""``POST /v1/completions`` (OpenAI's legacy completions, with vLLM's extensions): request checks and the answer.

A request: ``prompt`` (a string, a list of token ids, or a list of either: one choice per prompt), ``max_tokens``
(default 16; 0 only with ``echo``), ``temperature``, ``top_p``, ``seed``, ``stop``, ``n`` (1), ``echo``,
``logprobs`` (0..max_logprobs), and vLLM's ``prompt_logprobs``, ``return_tokens_as_token_ids`` and
``add_special_tokens``. Log-probabilities are ``log_softmax`` of the raw logits (no temperature), as vLLM's
default. Any parameter that would change the answer and is not implemented (``best_of`` > 1, ``suffix``,
``logit_bias``, penalties, ``stream``) is refused with 400 naming it, never ignored.
"""

from __future__ import annotations

from lmdistill.decoding import Completion, ContextLengthError, TokenLogprob
from lmdistill.serve.api_errors import ApiError
from lmdistill.serve.params import FLOOR, NEUTRAL, check_model, check_seed, check_supported, flag, number, stop_strings

KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "logprobs", "echo",
         "stop", "seed", "user", "prompt_logprobs", "return_tokens_as_token_ids", "add_special_tokens", *NEUTRAL}


def _token_list(value, where: str, vocab: int) -> list[int]:
    if not value:
        raise ApiError(400, f"{where} must not be empty", param="prompt", code="invalid_value")
    value = [int(t) if isinstance(t, float) and t.is_integer() else t for t in value]   # 3.0 is an integer to JSON
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int):
            raise ApiError(400, f"{where} must hold only integer token ids", param="prompt", code="invalid_type")
        if not 0 <= t < vocab:
            raise ApiError(400, f"{where}: token id {t} is outside this model's vocabulary (0..{vocab - 1})",
                           param="prompt", code="invalid_value")
    return list(value)


def parse_prompts(prompt, engine, *, add_special_tokens: bool, max_batch: int, max_tokens: int = 0,
                  truncate: bool = False) -> list[tuple[list[int], str | None]]:
    """``[(token ids, the prompt's text or None when given as ids), ...]``, one per prompt of the batch.

    A string prompt too long to fit beside ``max_tokens`` is refused (400 ``context_length_exceeded``) by
    ``ChatEngine.encode``'s character bound before it is tokenized (with ``truncate`` only its tail is)."""
    if prompt is None:
        raise ApiError(400, "'prompt' is a required property", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and not isinstance(prompt[0], (str, list))):
        prompt = [prompt]  # one prompt (a string or a list of token ids)
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of those",
                       param="prompt", code="invalid_type")
    if len(prompt) > max_batch:
        raise ApiError(400, f"'prompt' holds {len(prompt)} prompts; this server takes at most {max_batch} per request",
                       param="prompt", code="invalid_value")
    out = []
    for i, p in enumerate(prompt):
        where = f"prompt[{i}]" if len(prompt) > 1 else "prompt"
        if isinstance(p, str):
            try:
                ids = engine.encode(p, max_tokens, truncate=truncate, add_special_tokens=add_special_tokens,
                                    what=f"{where} uses")
            except ContextLengthError as e:
                raise ApiError(400, str(e), param="prompt", code="context_length_exceeded") from None
            out.append((_token_list(ids, f"{where} (tokenized)", engine.vocab_rows), p))
        elif isinstance(p, list):
            out.append((_token_list(p, where, engine.vocab_rows), None))
        else:
            raise ApiError(400, f"{where} must be a string or a list of token ids", param="prompt", code="invalid_type")
    return out


def parse_completion_request(body, *, engine, model_name: str, max_tokens_limit: int, max_logprobs: int,
                             max_batch: int, truncate_prompt: bool = False) -> dict:
    """Validate a completions body; return normalised parameters or raise ``ApiError``.

    ``req["truncate"]``: whether an over-long prompt may be cut to its last tokens (``truncate_prompt`` and
    plain generation: scores must cover the prompt as sent, so never with ``echo`` or ``prompt_logprobs``)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    check_supported(body, KNOWN, NEUTRAL)
    check_model(body, model_name)
    if flag(body, "stream", False):
        raise ApiError(400, "streaming is not supported for /v1/completions; send 'stream': false", param="stream",
                       code="unsupported_parameter")
    echo = flag(body, "echo", False)
    max_tokens = number(body, "max_tokens", min(16, max_tokens_limit), 0, max_tokens_limit, integer=True)
    if max_tokens == 0 and not echo:
        raise ApiError(400, "'max_tokens' must be >= 1 unless 'echo' is true", param="max_tokens", code="invalid_value")
    seed = check_seed(body)
    req = {
        "max_tokens": max_tokens, "echo": echo, "seed": seed, "stop": stop_strings(body),
        "n": number(body, "n", 1, 1, 1, integer=True),
        "temperature": float(number(body, "temperature", 1.0, 0.0, 2.0)),
        "top_p": float(number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
        "logprobs": number(body, "logprobs", None, 0, max_logprobs, integer=True),
        "prompt_logprobs": number(body, "prompt_logprobs", None, 0, max_logprobs, integer=True),
        "as_ids": flag(body, "return_tokens_as_token_ids", False),
    }
    req["truncate"] = truncate_prompt and not echo and req["prompt_logprobs"] is None
    # the prompts last: every cheap check has passed before any text is tokenized
    req["prompts"] = parse_prompts(body.get("prompt"), engine, max_batch=max_batch,
                                   add_special_tokens=flag(body, "add_special_tokens", True),
                                   max_tokens=max_tokens, truncate=req["truncate"])
    return req


def engine_kwargs(req: dict) -> dict:
    """What ``ChatEngine.complete_ids`` needs for this request (prompt scores when echo or prompt_logprobs ask)."""
    prompt_k = None
    if req["echo"] and req["logprobs"] is not None:
        prompt_k = req["logprobs"]
    if req["prompt_logprobs"] is not None:
        prompt_k = max(prompt_k or 0, req["prompt_logprobs"])
    return {"max_tokens": req["max_tokens"], "temperature": req["temperature"], "top_p": req["top_p"],
            "seed": req["seed"], "stop": req["stop"], "logprobs": req["logprobs"], "prompt_logprobs": prompt_k}


def _lp(value: float) -> float:
    return max(float(value), FLOOR)


def completion_logprobs(engine, ids: list[int], scores: list[TokenLogprob | None], k: int, as_ids: bool) -> dict:
    """OpenAI's ``logprobs`` object: tokens, token_logprobs, top_logprobs (top ``k`` plus the actual token, as
    vLLM sends) and text_offset (offsets of each token's text, decoded alone, into the choice's text)."""
    name = (lambda t: f"token_id:{t}") if as_ids else engine.piece
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for t, s in zip(ids, scores):
        tokens.append(name(t))
        offsets.append(offset)
        offset += len(engine.piece(t))
        if s is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(_lp(s.logprob))
        top = {name(i): _lp(lp) for i, lp in s.top[:k]}
        top.setdefault(name(t), _lp(s.logprob))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def vllm_prompt_logprobs(engine, scores: list[TokenLogprob | None], k: int) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: per prompt token ``None`` (the first) or ``{"<id>": {"logprob", "rank",
    "decoded_token"}}`` holding the top ``k`` (ranks 1..k) and the actual token with its rank."""
    out: list[dict | None] = []
    for s in scores:
        if s is None:
            out.append(None)
            continue
        entry = {str(i): {"logprob": _lp(lp), "rank": r + 1, "decoded_token": engine.piece(i)}
                 for r, (i, lp) in enumerate(s.top[:k])}
        entry.setdefault(str(s.token), {"logprob": _lp(s.logprob), "rank": s.rank,
                                        "decoded_token": engine.piece(s.token)})
        out.append(entry)
    return out


def completion_choice(engine, index: int, ids: list[int], prompt_text: str | None, done: Completion,
                      req: dict) -> dict:
    text = done.text
    if req["echo"]:
        text = (prompt_text if prompt_text is not None else engine.tokenizer.decode(ids)) + text
    logprobs = None
    if req["logprobs"] is not None:
        seq, scores = list(done.token_ids), list(done.logprobs or [])
        if req["echo"]:
            seq, scores = ids + seq, list(done.prompt_logprobs or [None] * len(ids)) + scores
        logprobs = completion_logprobs(engine, seq, scores, req["logprobs"], req["as_ids"])
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": done.finish_reason}
    if req["prompt_logprobs"] is not None:
        choice["prompt_logprobs"] = vllm_prompt_logprobs(engine, done.prompt_logprobs or [None], req["prompt_logprobs"])
    return choice
