"""Chat clients: any OpenAI-compatible endpoint, or a local Hugging Face model.

``make_client(spec)`` returns a ``ChatClient`` (``lmdistill.clients.base``):

- ``openai:MODEL@BASE_URL`` (e.g. ``openai:gpt-4o@https://api.openai.com/v1``,
  ``openai:qwen@http://127.0.0.1:8000/v1``): chat completions through the ``openai`` package. The key is
  read from ``OPENAI_API_KEY`` or from the variable named by ``api_key_env``. Our own retry policy
  (exponential back-off on 429, 5xx, timeouts and dropped connections) replaces the package's.
  ``OpenAIChatClient.prompt_logprobs(ids, top_k)`` / ``prompt_logprobs_many`` score given token sequences
  through the completions API (a served teacher), under the same policy.
- anything else: a local model folder or hub id, generated with transformers and its chat template.

``cache_path=...`` wraps the client in a ``CachedClient`` (see ``lmdistill.clients.cache``).
"""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from lmdistill.clients.base import (AuthenticationFailed, ChatClient, ClientError, RequestRejected, RetriesExhausted,
                                    RetryPolicy, retry_line, say_retry)
from lmdistill.clients.cache import CachedClient, ResponseCache
from lmdistill.decoding import ChatEngine, ContextLengthError
from lmdistill.models import load_model_and_tokenizer

T = TypeVar("T")
LOGPROB_APIS = ("echo", "prompt_logprobs")


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
        base = {"model": self.model, "messages": messages, "temperature": temperature, "top_p": top_p}
        if seed is not None:
            base["seed"] = seed

        def send(token_param: str) -> str:
            resp = self._client.chat.completions.create(**base, **{token_param: max_tokens})
            return _answer_text(resp, self.name)

        return self._with_retries(send, switch_token_param=True)

    def _with_retries(self, send: Callable[[str], T], *, switch_token_param: bool = False) -> T:
        """``send(token_param)`` under the retry policy: back-off on 429 (but not an exhausted quota), 5xx,
        408/409, timeouts and dropped connections (``max_retries``), and on a server that cannot be reached
        (``max_connect_retries``); 401/403 and other 4xx raised at once. Each wait is said in one line. With
        ``switch_token_param`` a 400 asking for ``max_completion_tokens`` switches the parameter once."""
        import openai

        last: Exception | None = None
        retries = connect_retries = 0
        connect_allowed = min(self.retry.max_connect_retries, self.retry.max_retries)
        started = time.monotonic()
        while True:
            with self._count_lock:
                self.attempts += 1
            retry_after, unreachable = None, None
            try:
                return send(self._token_param)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                hint = (f"; set {self.api_key_env}" if not self._key_given else f"; check the key in {self.api_key_env}")
                raise AuthenticationFailed(f"{self.name}: authentication failed ({e.status_code}){hint}") from None
            except openai.RateLimitError as e:
                if _error_code(e) == "insufficient_quota":  # out of credit: waiting will not help
                    raise ClientError(f"{self.name}: quota exhausted (429 insufficient_quota): {_error_message(e)}") \
                        from None
                last, retry_after, reason = e, _retry_after(e), "429 rate limited"
            except openai.APITimeoutError as e:
                last, reason = e, f"no answer within {self.timeout:g} s"
            except openai.APIConnectionError as e:
                unreachable = _connect_failure(e)
                last, reason = e, unreachable or f"connection dropped ({e.__cause__ or e})"
            except openai.APIStatusError as e:
                message = _error_message(e)
                if (switch_token_param and e.status_code == 400 and self._token_param == "max_tokens"
                        and "max_completion_tokens" in message):  # newer OpenAI models reject max_tokens
                    self._token_param = "max_completion_tokens"
                    continue
                if e.status_code < 500 and e.status_code not in (408, 409):  # 408/409 are transient
                    raise RequestRejected(f"{self.name}: request rejected ({e.status_code}): {_error_message(e)}",
                                          e.status_code) from None
                last, reason = e, f"{e.status_code} {message[:80]}".strip()
            except openai.APIResponseValidationError as e:
                last, reason = e, "malformed response"
            if unreachable is not None:
                if connect_retries >= connect_allowed:
                    n = connect_retries + 1
                    raise RetriesExhausted(
                        f"{self.name}: cannot connect to {self.base_url} ({unreachable}) after {n} attempt"
                        f"{'s' * (n != 1)} over {time.monotonic() - started:.0f} s; is the server running at that "
                        "address?")
                connect_retries += 1
                done, allowed = connect_retries, connect_allowed
            else:
                if retries >= self.retry.max_retries:
                    break
                retries += 1
                done, allowed = retries, self.retry.max_retries
            wait = self.retry.delay(done - 1, retry_after)
            say_retry(retry_line(self.base_url, reason, done, allowed, wait))
            time.sleep(wait)
        raise RetriesExhausted(f"{self.name}: no answer after {retries + connect_retries + 1} attempts "
                               f"(last error: {type(last).__name__}: {last})")

    def prompt_logprobs(self, token_ids: list[int], top_k: int, *,
                        api: str = "echo") -> list[dict[int, float] | None]:
        """For each position of ``token_ids``: the server's ``top_k`` most likely tokens there given the tokens
        before it, ``{token id: log-probability}`` (position 0: ``None``), through the completions API.

        ``api="echo"``: ``echo`` + ``logprobs`` with vLLM's ``return_tokens_as_token_ids`` (OpenAI-compatible
        servers that honour it); ``api="prompt_logprobs"``: vLLM's ``prompt_logprobs``. The ids are sent as
        ids and the answer is checked to cover exactly them. Retries as ``chat`` does.
        """
        return self.prompt_logprobs_many([token_ids], top_k, api=api)[0]

    def prompt_logprobs_many(self, batch: list[list[int]], top_k: int, *, api: str = "echo",
                             batch_size: int = 8) -> list[list[dict[int, float] | None]]:
        """``prompt_logprobs`` of every sequence of ``batch`` (in order): ``batch_size`` sequences per request
        (one request holds a list of prompts), up to ``concurrency`` requests in flight."""
        if api not in LOGPROB_APIS:
            raise ClientError(f"{self.name}: api must be one of {', '.join(LOGPROB_APIS)}, got {api!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ClientError(f"{self.name}: top_k must be a positive integer, got {top_k!r}")
        return self._logprobs_many(batch, top_k, api, batch_size)

    def token_logprobs_many(self, batch: list[list[int]], *, api: str = "echo",
                            batch_size: int = 8) -> list[list[float | None]]:
        """For each sequence of ``batch``: the log-probability of each of its own tokens given the ones before it
        (position 0: ``None``), and nothing else: ``echo`` with ``logprobs: 0``, or vLLM's ``prompt_logprobs: 0``
        (no top-k asked, so the answer holds one score per token). Batched and retried as ``prompt_logprobs_many``."""
        return self._logprobs_many(batch, 0, api, batch_size)

    def _logprobs_many(self, batch: list[list[int]], top_k: int, api: str, batch_size: int) -> list:
        """``top_k`` > 0: ``prompt_logprobs_many``; 0: ``token_logprobs_many``."""
        if api not in LOGPROB_APIS:
            raise ClientError(f"{self.name}: api must be one of {', '.join(LOGPROB_APIS)}, got {api!r}")
        for row in batch:
            if (not isinstance(row, (list, tuple)) or not row
                    or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in row)):
                raise ClientError(f"{self.name}: each sequence must be a non-empty list of token ids")
        rows = [[int(t) for t in row] for row in batch]
        groups = [rows[i:i + max(1, batch_size)] for i in range(0, len(rows), max(1, batch_size))]
        workers = max(1, min(self.concurrency, len(groups)))
        if workers == 1:
            answers = [self._score_group(g, top_k, api) for g in groups]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                answers = list(pool.map(lambda g: self._score_group(g, top_k, api), groups))
        return [row for group in answers for row in group]

    def _score_group(self, rows: list[list[int]], top_k: int, api: str) -> list[list[dict[int, float] | None]]:
        if api == "echo":
            params = {"echo": True, "logprobs": top_k, "extra_body": {"return_tokens_as_token_ids": True}}
        else:
            params = {"extra_body": {"prompt_logprobs": top_k}}

        def send(_token_param: str):
            # the raw JSON: building the package's models of megabytes of logprobs costs more than the request
            raw = self._client.completions.with_raw_response.create(model=self.model, prompt=rows, max_tokens=1,
                                                                    temperature=0.0, **params)
            try:
                body = raw.http_response.json()
                choices = sorted(body["choices"], key=lambda c: c["index"])
            except (ValueError, KeyError, TypeError):
                raise ClientError(f"{self.name}: the completions answer is not an OpenAI completion") from None
            if len(choices) != len(rows):
                raise ClientError(f"{self.name}: {len(rows)} prompts sent, {len(choices)} choices returned")
            parse = _echo_logprobs if api == "echo" else _vllm_prompt_logprobs
            if top_k == 0:   # token_logprobs_many: each token's own log-probability
                parse = _echo_token_logprobs if api == "echo" else _vllm_token_logprobs
            return [parse(c, ids, top_k, self.name) for c, ids in zip(choices, rows)]

        return self._with_retries(send)

    def close(self) -> None:
        self._client.close()


def _top(entries: dict[int, float], top_k: int) -> dict[int, float]:
    return dict(sorted(entries.items(), key=lambda kv: -kv[1])[:top_k])


def _token_id(key: str, name: str) -> int:
    if not (isinstance(key, str) and key.startswith("token_id:")):
        raise ClientError(f"{name}: the server ignored return_tokens_as_token_ids (it sent the token {key!r}, not "
                          "'token_id:N'); use api='prompt_logprobs' or a vLLM / lmdistill server")
    try:
        return int(key[len("token_id:"):])
    except ValueError:
        raise ClientError(f"{name}: bad token key {key!r} in the logprobs") from None


def _echoed(choice: dict, ids: list[int], field: str, name: str) -> list:
    """The echo answer's ``logprobs[field]`` list, once its echoed tokens are checked to be exactly ``ids``."""
    lp = choice.get("logprobs")
    tokens, values = (lp.get("tokens"), lp.get(field)) if isinstance(lp, dict) else (None, None)
    if not isinstance(tokens, list) or not isinstance(values, list):
        raise ClientError(f"{name}: the answer has no logprobs (does the server support echo with logprobs?)")
    if (len(tokens) < len(ids) or len(values) < len(ids)
            or [_token_id(t, name) for t in tokens[:len(ids)]] != ids):
        raise ClientError(f"{name}: the server re-tokenized the prompt (the echoed tokens differ from the ids sent)")
    return values


def _echo_logprobs(choice: dict, ids: list[int], top_k: int, name: str) -> list[dict[int, float] | None]:
    tops = _echoed(choice, ids, "top_logprobs", name)
    out: list[dict[int, float] | None] = [None]
    for entry in tops[1:len(ids)]:
        if not isinstance(entry, dict) or not entry:
            raise ClientError(f"{name}: a prompt position after the first has no top_logprobs")
        out.append(_top({_token_id(k, name): float(v) for k, v in entry.items()}, top_k))
    return out


def _vllm_entries(choice: dict, ids: list[int], name: str) -> list:
    """vLLM's ``prompt_logprobs`` list of the answer, one entry per id sent (else the prompt was re-tokenized)."""
    entries = choice.get("prompt_logprobs")
    if entries is None:
        raise ClientError(f"{name}: the answer has no prompt_logprobs (the server does not support vLLM's "
                          "prompt_logprobs; use api='echo')")
    if len(entries) != len(ids):
        raise ClientError(f"{name}: the server re-tokenized the prompt ({len(ids)} ids sent, "
                          f"{len(entries)} prompt_logprobs returned)")
    return entries


def _vllm_prompt_logprobs(choice: dict, ids: list[int], top_k: int, name: str) -> list[dict[int, float] | None]:
    entries = _vllm_entries(choice, ids, name)
    out: list[dict[int, float] | None] = [None]
    for i, entry in enumerate(entries[1:], start=1):
        try:
            scores = {int(k): float(v["logprob"] if isinstance(v, dict) else v) for k, v in (entry or {}).items()}
        except (TypeError, ValueError, KeyError):
            raise ClientError(f"{name}: malformed prompt_logprobs entry at position {i}") from None
        if ids[i] not in scores:  # vLLM always lists the actual prompt token
            raise ClientError(f"{name}: the server re-tokenized the prompt (token {ids[i]} at position {i} is not "
                              "among its prompt_logprobs)")
        out.append(_top(scores, top_k))
    return out


def _echo_token_logprobs(choice: dict, ids: list[int], _k: int, name: str) -> list[float | None]:
    lps = _echoed(choice, ids, "token_logprobs", name)
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in lps[1:len(ids)]):
        raise ClientError(f"{name}: a prompt position after the first has no token_logprobs")
    return [None, *(float(v) for v in lps[1:len(ids)])]


def _vllm_token_logprobs(choice: dict, ids: list[int], _k: int, name: str) -> list[float | None]:
    entries = _vllm_entries(choice, ids, name)
    out: list[float | None] = [None]
    for i, entry in enumerate(entries[1:], start=1):
        v = entry.get(str(ids[i])) if isinstance(entry, dict) else None   # vLLM always lists the actual token
        try:
            out.append(float(v["logprob"] if isinstance(v, dict) else v))
        except (TypeError, ValueError, KeyError):
            raise ClientError(f"{name}: no prompt_logprobs for token {ids[i]} at position {i}") from None
    return out


def _answer_text(resp, name: str) -> str:
    try:
        content = resp.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        raise RequestRejected(f"{name}: the response had no choices") from None
    return content or ""


def _connect_failure(err) -> str | None:
    """Why a request never reached its server (connection refused, unknown host), or None when it may have (a
    dropped connection, a timeout): httpx's ``ConnectError`` behind the openai package's ``APIConnectionError``."""
    cause = err.__cause__
    if cause is None or not any(c.__name__ == "ConnectError" for c in type(cause).__mro__):
        return None
    text = str(cause)
    if "refused" in text.lower():
        return "connection refused"
    return re.sub(r"^\[Errno -?\d+\]\s*", "", text) or "cannot connect"


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
    """A local Hugging Face model generating with its chat template (temperature 0 = greedy).

    Requests decode as one batch (``lmdistill.decoding.ChatEngine`` with ``max_batch_size``: the continuous
    batching ``lmdistill serve`` uses too): ``concurrency`` is the batch size, so ``chat_many``'s threads keep
    the batch full, and each request gets what it gets alone (its own settings and seed). ``max_batch_size=0``
    decodes one request at a time.
    A given ``engine`` is used as it is (batched or not).
    """

    def __init__(self, path: str, *, device: str | None = None, dtype: str = "float32", name: str | None = None,
                 truncate_prompt: bool = True, engine=None, max_batch_size: int = 16):
        self._owns_engine = engine is None
        if engine is None:
            model, tokenizer = load_model_and_tokenizer(path, dtype=dtype, device=device)
            engine = ChatEngine(model, tokenizer, truncate_prompt=truncate_prompt,
                                max_batch_size=max_batch_size or None)  # no queue bound: nothing to refuse in-process
        self.engine = engine
        self.name = name or str(path)
        batcher = getattr(engine, "batcher", None)
        self.concurrency = batcher.max_batch if batcher is not None else 1  # unbatched, the engine serialises anyway

    def _chat(self, messages, *, temperature, max_tokens, top_p, seed) -> str:
        try:
            return self.engine.complete(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                        seed=seed).text
        except ContextLengthError as e:
            raise RequestRejected(f"{self.name}: {e}", 400) from None

    def close(self) -> None:
        if self._owns_engine:
            self.engine.close()


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
