"""The app's endpoints, one ``APIRouter`` per resource, each built for one ``ServeContext``.

- ``models_router``: ``GET /v1/models`` (the served model; the key is checked) and ``GET /health`` (no key).
- ``chat_router``: ``POST /v1/chat/completions`` (``lmdistill.serve.chat``), JSON or server-sent events.
- ``completions_router``: ``POST /v1/completions`` (``lmdistill.serve.completions``), one choice per prompt.

The request bodies' JSON Schemas (``lmdistill.serve.openapi``) are attached as ``openapi_extra``: the endpoints
read their bodies themselves, so FastAPI cannot derive them. No module-level ``from __future__ import
annotations`` here: FastAPI reads the endpoints' ``Request`` annotation as a class.
"""

import time
import uuid

from lmdistill.decoding import ContextLengthError, QueueFull
from lmdistill.serve.api_errors import ApiError
from lmdistill.serve.chat import CHAT_NEUTRAL, answer, parse_request, sse
from lmdistill.serve.completions import completion_choice, engine_kwargs, parse_completion_request
from lmdistill.serve.context import ServeContext
from lmdistill.serve.openapi import chat_request_schema, completion_request_schema, operation


def models_router(ctx: ServeContext):
    from fastapi import APIRouter, Request

    router = APIRouter()

    @router.get("/v1/models")
    async def list_models(request: Request):
        ctx.check_key(request)
        return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": ctx.created,
                                            "owned_by": "lmdistill"}]}

    @router.get("/health")
    async def health():
        return {"status": "ok"}

    return router


def chat_router(ctx: ServeContext):
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    router = APIRouter()
    engine = ctx.engine
    schema = chat_request_schema(max_tokens_limit=ctx.max_tokens_limit, max_logprobs=ctx.max_logprobs,
                                 neutral=CHAT_NEUTRAL)

    @router.post("/v1/chat/completions", openapi_extra=operation(schema, authenticated=ctx.api_key is not None))
    async def chat_completions(request: Request):
        body = await ctx.read_json(request)
        req = parse_request(body, model_name=ctx.model_name, max_tokens_limit=ctx.max_tokens_limit,
                            default_max_tokens=ctx.default_max_tokens, max_logprobs=ctx.max_logprobs)
        gen_kwargs = {k: req[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop", "logprobs")}
        ctx.refuse_if_full()
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
                raise ctx.busy(e) from None
            return ctx.stream(sse(engine, stream, scores, req, cid, now, ctx.model_name))
        done = await ctx.generate(engine.complete_ids, ids, **gen_kwargs)
        return JSONResponse(answer(engine, done, req, cid, now, ctx.model_name))

    return router


def completions_router(ctx: ServeContext):
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    router = APIRouter()
    engine = ctx.engine
    schema = completion_request_schema(max_tokens_limit=ctx.max_tokens_limit, max_logprobs=ctx.max_logprobs,
                                       vocab=engine.vocab_rows, max_batch=ctx.max_batch_prompts)

    @router.post("/v1/completions", openapi_extra=operation(schema, authenticated=ctx.api_key is not None))
    async def completions(request: Request):
        body = await ctx.read_json(request)
        ctx.refuse_if_full()
        # in a worker: string prompts are tokenized here (after the cheap length bound)
        req = await run_in_threadpool(lambda: parse_completion_request(
            body, engine=engine, model_name=ctx.model_name, max_tokens_limit=ctx.max_tokens_limit,
            max_logprobs=ctx.max_logprobs, max_batch=ctx.max_batch_prompts, truncate_prompt=ctx.truncate_prompt))
        prompts = _fitted_prompts(engine, req)
        # batched: all the prompts join the batch together
        done = await ctx.generate(engine.complete_many_ids, [ids for ids, _ in prompts], **engine_kwargs(req))
        choices = [completion_choice(engine, i, ids, text, d, req)
                   for i, ((ids, text), d) in enumerate(zip(prompts, done))]
        prompt_tokens = sum(d.prompt_tokens for d in done)
        completion_tokens = sum(d.completion_tokens for d in done)
        # a JSONResponse as is: FastAPI's encoder walking megabytes of nested logprobs costs more than the forward
        return JSONResponse({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                             "created": int(time.time()), "model": ctx.model_name, "choices": choices,
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens}})

    return router


def _fitted_prompts(engine, req: dict) -> list[tuple[list[int], str | None]]:
    """Each prompt's ids fitted to the context beside ``max_tokens`` (400 when they cannot be), with its text when
    it is still the prompt as sent. Scores must cover the prompt as sent: only plain generation may cut an
    over-long prompt (``req["truncate"]``)."""
    prompts = []
    for i, (ids, text) in enumerate(req["prompts"]):
        try:
            fitted = engine.fit(ids, req["max_tokens"], truncate=req["truncate"],
                                what=f"prompt[{i}] uses" if len(req["prompts"]) > 1 else "the prompt uses")
        except ContextLengthError as e:
            raise ApiError(400, str(e), param="prompt", code="context_length_exceeded") from None
        prompts.append((fitted, text if fitted is ids else None))
    return prompts
