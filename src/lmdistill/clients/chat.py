"""Chat clients: any OpenAI-compatible endpoint, or a local Hugging Face model.

``make_client(spec)`` returns a ``ChatClient`` (``lmdistill.clients.base``):

- ``openai:MODEL@BASE_URL`` (e.g. ``openai:gpt-4o@https://api.openai.com/v1``,
  ``openai:qwen@http://127.0.0.1:8000/v1``): chat completions through the ``openai`` package. The key is
  read from ``OPENAI_API_KEY`` or from the variable named by ``api_key_env``. Our own retry policy
  (exponential back-off on 429, 5xx, timeouts and dropped connections) replaces the package's.
- anything else: a local model folder or hub id, generated with transformers and its chat template.

``cache_path=...`` wraps the client in a ``CachedClient`` (see ``lmdistill.clients.cache``).
"""

from __future__ import annotations

import os
import threading
import time

from lmdistill.clients.base import (AuthenticationFailed, ChatClient, ClientError, RequestRejected, RetriesExhausted,
                                    RetryPolicy)
from lmdistill.clients.cache import CachedClient, ResponseCache
from lmdistill.models import load_model_and_tokenizer
from lmdistill.serve.engine import ChatEngine, ContextLengthError


def parse_openai_spec(spec: str) -> tuple[str, str]:
    body = spec[len("openai:"):]
    model, sep, base_url = body.rpartition("@")
    if not sep or not model or not base_url.startswith(("http://", "https://")):
        raise ClientError(f"bad model spec {spec!r}: expected openai:MODEL@BASE_URL "
                          "(e.g. openai:gpt-4o@https://api.openai.com/v1)")
    return model, base_url.rstrip("/")


class OpenAIChatClient(ChatClient):
    """Chat completions against an OpenAI-compatible server, with our retry policy."""

    def __init__(self, model: str, base_url: str, *, api_key: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, retry: RetryPolicy | None = None, concurrency: int = 4,
                 name: str | None = None):
        import openai

        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        key = api_key if api_key is not None else os.environ.get(api_key_env)
        self._key_given = bool(key)
        self.retry = retry or RetryPolicy()
        self.concurrency = max(1, int(concurrency))
        self.name = name or f"openai:{model}@{base_url}"
        self.timeout = timeout
        # max_retries=0: the package's own retries are off, so the policy here is the only one.
        self._client = openai.OpenAI(api_key=key or "no-key-set", base_url=base_url, timeout=timeout, max_retries=0)
        self.attempts = 0  # requests sent, retries included (for tests and reports)
        self._token_param = "max_tokens"  # switched once if the server asks for max_completion_tokens
        self._count_lock = threading.Lock()

    def _chat(self, messages, *, temperature, max_tokens, top_p, seed) -> str:
        import openai

        base = {"model": self.model, "messages": messages, "temperature": temperature, "top_p": top_p}
        if seed is not None:
            base["seed"] = seed
        last: Exception | None = None
        for attempt in range(self.retry.max_retries + 1):
            kwargs = {**base, self._token_param: max_tokens}
            with self._count_lock:
                self.attempts += 1
            retry_after = None
            try:
                resp = self._client.chat.completions.create(**kwargs)
                return _answer_text(resp, self.name)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                hint = (f"; set {self.api_key_env}" if not self._key_given else f"; check the key in {self.api_key_env}")
                raise AuthenticationFailed(f"{self.name}: authentication failed ({e.status_code}){hint}") from None
            except openai.RateLimitError as e:
                if _error_code(e) == "insufficient_quota":  # out of credit: waiting will not help
                    raise ClientError(f"{self.name}: quota exhausted (429 insufficient_quota): {_error_message(e)}") \
                        from None
                last, retry_after = e, _retry_after(e)
            except openai.APITimeoutError as e:
                last = e
            except openai.APIConnectionError as e:
                last = e
            except openai.APIStatusError as e:
                message = _error_message(e)
                if (e.status_code == 400 and self._token_param == "max_tokens"
                        and "max_completion_tokens" in message):  # newer OpenAI models reject max_tokens
                    self._token_param = "max_completion_tokens"
                    continue
                if e.status_code < 500 and e.status_code not in (408, 409):  # 408/409 are transient
                    raise RequestRejected(f"{self.name}: request rejected ({e.status_code}): {_error_message(e)}",
                                          e.status_code) from None
                last = e
            except openai.APIResponseValidationError as e:
                last = e
            if attempt < self.retry.max_retries:
                time.sleep(self.retry.delay(attempt, retry_after))
        raise RetriesExhausted(f"{self.name}: no answer after {self.retry.max_retries + 1} attempts "
                               f"(last error: {type(last).__name__}: {last})")

    def close(self) -> None:
        self._client.close()


def _answer_text(resp, name: str) -> str:
    try:
        content = resp.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        raise RequestRejected(f"{name}: the response had no choices") from None
    return content or ""


def _retry_after(err) -> float | None:
    try:
        value = err.response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, ValueError):
        return None


def _error_code(err) -> str | None:
    body = getattr(err, "body", None)
    inner = body.get("error", body) if isinstance(body, dict) else None
    return inner.get("code") if isinstance(inner, dict) else None


def _error_message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(err)


class LocalChatClient(ChatClient):
    """A local Hugging Face model generating with its chat template (temperature 0 = greedy)."""

    def __init__(self, path: str, *, device: str | None = None, dtype: str = "float32", name: str | None = None,
                 truncate_prompt: bool = True, engine=None):
        if engine is None:
            model, tokenizer = load_model_and_tokenizer(path, dtype=dtype, device=device)
            engine = ChatEngine(model, tokenizer, truncate_prompt=truncate_prompt)
        self.engine = engine
        self.name = name or str(path)
        self.concurrency = 1  # the engine serialises generation anyway

    def _chat(self, messages, *, temperature, max_tokens, top_p, seed) -> str:
        try:
            return self.engine.complete(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                        seed=seed).text
        except ContextLengthError as e:
            raise RequestRejected(f"{self.name}: {e}", 400) from None


def make_client(spec: str, *, api_key_env: str = "OPENAI_API_KEY", api_key: str | None = None,
                timeout: float = 120.0, max_retries: int = 6, base_delay: float = 1.0, max_delay: float = 60.0,
                concurrency: int = 4, device: str | None = None, dtype: str = "float32", name: str | None = None,
                cache_path=None, cache=None) -> ChatClient:
    """Build a client for ``spec`` (``openai:MODEL@BASE_URL`` or a local folder / hub id).

    ``cache_path`` (a JSONL file) or ``cache`` (a ``ResponseCache``) adds the crash-safe response cache.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ClientError("empty model spec")
    spec = spec.strip()
    if spec.startswith("openai:"):
        model, base_url = parse_openai_spec(spec)
        client: ChatClient = OpenAIChatClient(
            model, base_url, api_key=api_key, api_key_env=api_key_env, timeout=timeout,
            retry=RetryPolicy(max_retries=max_retries, base_delay=base_delay, max_delay=max_delay),
            concurrency=concurrency, name=name)
    else:
        client = LocalChatClient(spec, device=device, dtype=dtype, name=name)
    if cache is not None or cache_path is not None:
        client = CachedClient(client, cache if cache is not None else ResponseCache(cache_path))
    return client
