"""An OpenAI-compatible chat server for a local model (FastAPI): HTTP only, the decoding is ``lmdistill.decoding``.

``create_app(model, tokenizer, model_name=..., api_key=..., max_tokens_limit=...)`` builds the app:
``GET /v1/models``, ``POST /v1/chat/completions`` (plain JSON, or server-sent events with ``stream: true``
ending in ``data: [DONE]``), ``POST /v1/completions`` (raw prompts or token ids, ``echo``, ``logprobs`` and
vLLM's ``prompt_logprobs``: see ``lmdistill.serve.completions``), ``GET /openapi.json`` (the request bodies'
JSON Schemas with this server's limits: ``lmdistill.serve.openapi``; no key needed). Every failure is answered
with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}`` (``lmdistill.serve.api_errors``): 401
for a missing or wrong key, 400 for a malformed request, 404 for an unknown model or route, 413 for a body over
``max_body_bytes``, 429 with ``Retry-After`` when the batch and its queue are full; never a 500 for bad input.

Concurrent requests decode together (``max_batch_size``, continuous batching: ``lmdistill.decoding.batcher``); at
most ``max_queue`` more wait for a place, and a request past that is refused at once (before its prompt is
tokenized when the queue is already full). A streamed request is queued before its response starts, so a full
queue is a 429, never a broken stream; a client that hangs up takes its request out of the batch.

The server bounds itself: a body over the limit is refused while it is read (``lmdistill.serve.body``); a prompt
with more characters than the context can hold is refused before it is tokenized (``ChatEngine.encode``); JSON
parsing, tokenization and generation run in worker threads, off the event loop, so ``/health`` and small requests
are answered during a burst of big ones (``lmdistill.serve.context``). Every chat parameter is honoured
(``logprobs`` / ``top_logprobs`` in OpenAI's chat format, streamed too) or refused with 400 naming it.

The endpoints are ``APIRouter``s (``lmdistill.serve.routers``): models and health, chat completions, completions.
"""

from lmdistill import __version__
from lmdistill.decoding import ChatEngine
from lmdistill.serve.api_errors import install_error_handlers
from lmdistill.serve.body import default_max_body_bytes
from lmdistill.serve.context import ServeContext
from lmdistill.serve.routers import chat_router, completions_router, models_router

DEFAULT_MAX_BATCH = 16  # requests decoded together
DEFAULT_MAX_QUEUE = 64  # requests waiting for a place in the batch before 429


def create_app(model, tokenizer, *, model_name: str = "local", api_key: str | None = None,
               max_tokens_limit: int = 2048, default_max_tokens: int = 256, truncate_prompt: bool = False,
               max_body_bytes: int | None = None, max_logprobs: int = 20, max_batch_prompts: int = 64,
               max_batch_size: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE):
    """The FastAPI app serving ``model``. Forward passes are serialised on the model by its ``ModelHandle``'s lock.

    ``max_batch_size``: how many requests decode together (continuous batching, ``lmdistill.decoding.batcher``;
    0: none, each request decodes alone and concurrent ones take turns token by token); ``max_queue``: how many
    more may wait for a place in the batch; past that a request is answered 429 with ``Retry-After``.

    ``max_body_bytes``: the largest request body (413 past it; default ``default_max_body_bytes(model)``);
    ``max_logprobs``: the largest ``logprobs`` / ``prompt_logprobs`` a completions request, or ``top_logprobs``
    a chat request, may ask for (vLLM's ``--max-logprobs``); ``max_batch_prompts``: the most prompts one
    completions request may hold.
    """
    from fastapi import FastAPI

    engine = ChatEngine(model, tokenizer, truncate_prompt=truncate_prompt, max_batch_size=max_batch_size or None,
                        max_queue=max_queue)
    ctx = ServeContext(engine, model_name=model_name, api_key=api_key, max_tokens_limit=max_tokens_limit,
                       default_max_tokens=default_max_tokens, max_logprobs=max_logprobs,
                       max_batch_prompts=max_batch_prompts, truncate_prompt=truncate_prompt,
                       max_body_bytes=default_max_body_bytes(model) if max_body_bytes is None else max_body_bytes)
    # GET /openapi.json describes the request bodies (lmdistill.serve.openapi): clients and fuzzers build on it
    app = FastAPI(title="lmdistill serve", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.engine = engine
    app.state.max_body_bytes = ctx.max_body_bytes
    install_error_handlers(app)
    for router in (models_router(ctx), chat_router(ctx), completions_router(ctx)):
        app.include_router(router)
    return app
