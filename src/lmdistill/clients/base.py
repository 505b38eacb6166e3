"""What every chat client shares: the ``ChatClient`` interface, its errors, and the retry policy.

``ChatClient.chat`` returns the answer text; ``chat_many`` runs many requests on a bounded thread pool.
The concrete clients (``lmdistill.clients.chat``) and the response cache (``lmdistill.clients.cache``) both
build on this module, so neither imports the other's internals.
"""

from __future__ import annotations

import random
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
    """Exponential back-off: wait ``base_delay * 2**attempt`` (capped at ``max_delay``, +-``jitter``).

    ``max_retries`` bounds the retries of a server that answers but cannot serve now (429, 5xx, a timeout, a dropped
    connection): 6 at base 1 s wait up to 63 s in all. A server that cannot be reached at all (connection refused,
    unknown host) gets ``max_connect_retries`` (3: 1 + 2 + 4 = 7 s; never more than ``max_retries``), enough for a
    restart, not for a wrong address.
    Each wait is said in one line (``retry_line``)."""

    max_retries: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    jitter: float = 0.1
    max_connect_retries: int = 3

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        wait = min(self.max_delay, self.base_delay * (2 ** attempt))
        if retry_after is not None:
            wait = min(self.max_delay, max(wait, retry_after))
        return max(0.0, wait * (1 + random.uniform(-self.jitter, self.jitter)))


def retry_line(url: str, reason: str, retry: int, retries: int, wait: float) -> str:
    """The line a client writes before it waits to retry: what it waits for, why, which retry and how long."""
    return f"[lmdistill] waiting for {url}: {reason}, retry {retry}/{retries} in {wait:.1f} s"


def say_retry(line: str) -> None:
    """Write a retry line on stderr without breaking a progress bar (tqdm is loaded by then where one is drawn)."""
    import sys

    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def answer_each(ask, count: int, concurrency: int, progress: str | None = None) -> list:
    """``[ask(0), ..., ask(count - 1)]`` with at most ``concurrency`` calls in flight (threads; in this thread when
    1); a call that raises ``ClientError`` gives the error in its place. ``progress``: a tqdm bar's label."""
    from tqdm import tqdm

    results: list = [None] * count
    bar = tqdm(total=count, desc=progress, disable=progress is None, leave=False)

    def one(i: int) -> None:
        try:
            results[i] = ask(i)
        except ClientError as e:
            results[i] = e
        finally:
            bar.update(1)

    workers = max(1, min(concurrency, count))
    if workers == 1:
        for i in range(count):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(count)))
    bar.close()
    return results


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
        results = answer_each(lambda i: self.chat(batch[i], **params), len(batch), self.concurrency, progress)
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
