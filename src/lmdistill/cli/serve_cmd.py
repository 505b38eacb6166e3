"""``lmdistill serve MODEL``: an OpenAI-compatible server (chat and legacy completions) for a local model."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from lmdistill.cli import COMMANDS
from lmdistill.errors import ConfigError
from lmdistill.models import load_model_and_tokenizer
from lmdistill.serve.app import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, create_app
from lmdistill.serve.server import serve_forever


def register(sub) -> None:
    p = sub.add_parser("serve", help=COMMANDS["serve"])
    p.add_argument("model", help="local model folder or hub id")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback only unless changed)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set LMDISTILL_API_KEY)")
    p.add_argument("--model-name", default=None, help="name clients must send as 'model' (default: the folder name)")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask for")
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="largest logprobs / prompt_logprobs a /v1/completions request may ask for (as vLLM's)")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body in bytes, answered 413 past it (default: 16 bytes per position of "
                        "the model's context, at least 1 MiB; 8 MiB when the model does not say its context)")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH,
                   help="requests decoded together, joining and leaving the batch at each step (0: no batching, "
                        "each request decodes alone and concurrent ones take turns token by token)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests that may wait for a place in the batch; past that a request is answered 429 "
                        "with Retry-After")
    p.add_argument("--truncate-prompt", action="store_true",
                   help="keep the last tokens of an over-long prompt instead of answering 400")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    if args.max_tokens_limit < 1:
        raise ConfigError("--max-tokens-limit must be at least 1")
    if args.max_logprobs < 0:
        raise ConfigError("--max-logprobs must be at least 0")
    if args.max_body_bytes is not None and args.max_body_bytes < 1:
        raise ConfigError("--max-body-bytes must be at least 1")
    if args.max_batch_size < 0:
        raise ConfigError("--max-batch-size must be at least 0 (0: no batching)")
    if args.max_queue < 0:
        raise ConfigError("--max-queue must be at least 0")
    api_key = args.api_key or os.environ.get("LMDISTILL_API_KEY")
    try:
        public = not ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        public = args.host != "localhost"
    if public and not api_key:
        print(f"warning: serving on {args.host} without an API key; anyone who can reach it can use the model",
              file=sys.stderr)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    name = args.model_name or Path(args.model.rstrip("/")).name
    app = create_app(model, tokenizer, model_name=name, api_key=api_key, max_tokens_limit=args.max_tokens_limit,
                     default_max_tokens=min(256, args.max_tokens_limit), truncate_prompt=args.truncate_prompt,
                     max_logprobs=args.max_logprobs, max_body_bytes=args.max_body_bytes,
                     max_batch_size=args.max_batch_size, max_queue=args.max_queue)
    print(f"serving {name} on http://{args.host}:{args.port}/v1 (client spec: openai:{name}@http://{args.host}:{args.port}/v1; "
          f"request bodies up to {app.state.max_body_bytes} bytes; "
          + (f"batches of up to {args.max_batch_size}, {args.max_queue} more queued)" if args.max_batch_size
             else "no batching)"), file=sys.stderr)
    serve_forever(app, host=args.host, port=args.port)
    return 0
