"""Chat clients: any OpenAI-compatible endpoint, or a local Hugging Face model.

``make_client(spec)`` returns a ``ChatClient``:

- ``openai:MODEL@BASE_URL`` (e.g. ``openai:gpt-4o@https://api.openai.com/v1``,
  ``openai:qwen@http://127.0.0.1:8000/v1``): chat completions through the ``openai`` package. The key is
  read from ``OPENAI_API_KEY`` or from the variable named by ``api_key_env``. Our own retry policy
  (exponential back-off on 429, 5xx, timeouts and dropped connections) replaces the package's.
- anything else: a local model folder or hub id, generated with transformers and its chat template.

``chat`` returns the answer text; ``chat_many`` runs many requests on a bounded thread pool.
``cache_path=...`` wraps the client in a ``CachedClient`` (see ``lmdistill.quantify.cache``).
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from lmdistill.errors import LmdistillError


class ClientError(LmdistillError):
    """A model endpoint could not give an answer."""


class AuthenticationFailed(ClientError):
    """401/403: the key is missing, wrong or lacks permission. Never retried."""


class RequestRejected(ClientError):
    """A 4xx other than 401/403/429 (bad request, unknown model, prompt too long). Never retried."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RetriesExhausted(ClientError):
    """The endpoint kept failing (429, 5xx, timeout) after every retry."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off: wait ``base_delay * 2**attempt`` (capped at ``max_delay``, +-``jitter``)."""

    max_retries: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    jitter: float = 0.1

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        wait = min(self.max_delay, self.base_delay * (2 ** attempt))
        if retry_after is not None:
            wait = min(self.max_delay, max(wait, retry_after))
        return max(0.0, wait * (1 + random.uniform(-self.jitter, self.jitter)))


class ChatClient:
    """Base class. Subclasses implement ``_chat``; ``name`` identifies the model in caches and reports."""

    name: str = "client"
    concurrency: int = 1

    def chat(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 256, top_p: float = 1.0,
             seed: int | None = None) -> str:
        check_messages(messages)
        # normalised types, so 0 and 0.0 give the same cache key
        return self._chat(messages, temperature=float(temperature), max_tokens=int(max_tokens), top_p=float(top_p),
                          seed=None if seed is None else int(seed))

    def _chat(self, messages, **params) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def chat_many(self, batch: Sequence[list[dict]], *, return_exceptions: bool = False, progress: str | None = None,
                  **params) -> list:
        """Answer every message list in ``batch`` (in order) with at most ``concurrency`` requests in flight.

        With ``return_exceptions`` a failed request gives its ``ClientError`` in place of the answer;
        otherwise the first failure is raised once all requests have finished (the others are kept, and
        cached when the client caches).
        """
        from tqdm import tqdm

        results: list = [None] * len(batch)
        bar = tqdm(total=len(batch), desc=progress, disable=progress is None, leave=False)

        def one(i: int) -> None:
            try:
                results[i] = self.chat(batch[i], **params)
            except ClientError as e:
                results[i] = e
            finally:
                bar.update(1)

        workers = max(1, min(self.concurrency, len(batch)))
        if workers == 1:
            for i in range(len(batch)):
                one(i)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(one, range(len(batch))))
        bar.close()
        if not return_exceptions:
            for r in results:
                if isinstance(r, ClientError):
                    raise r
        return results

    def close(self) -> None:
        pass


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ClientError("messages must be a non-empty list of {'role', 'content'} dicts")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ClientError(f"bad message {m!r}: need {{'role': str, 'content': str}}")


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
        from lmdistill.serve.engine import ChatEngine

        if engine is None:
            from lmdistill.models import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(path, dtype=dtype, device=device)
            engine = ChatEngine(model, tokenizer, truncate_prompt=truncate_prompt)
        self.engine = engine
        self.name = name or str(path)
        self.concurrency = 1  # the engine serialises generation anyway

    def _chat(self, messages, *, temperature, max_tokens, top_p, seed) -> str:
        from lmdistill.serve.engine import ContextLengthError

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
        from lmdistill.quantify.cache import CachedClient, ResponseCache

        client = CachedClient(client, cache if cache is not None else ResponseCache(cache_path))
    return client
