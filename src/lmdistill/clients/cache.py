"""A crash-safe response cache: one JSONL line per answered request, appended before the next request.

Each line holds ``key`` (sha256 of model name, messages and parameters), the request and either its
``answer`` or a deterministic ``error`` (a rejected request: 400, prompt too long). Lines are fsynced by
``JsonlAppender``; a torn last line from a kill -9 is cut on open. A rerun reads the file and asks only
what is missing: no request is paid twice, no answer is lost, and a key is never written twice.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from lmdistill.errors import ConfigError
from lmdistill.io import JsonlAppender, iter_jsonl_rows, truncate_torn_tail
from lmdistill.clients.base import ChatClient, RequestRejected


def request_key(model: str, messages: list[dict], params: dict) -> str:
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Thread-safe map ``key -> record`` backed by an append-only JSONL file."""

    def __init__(self, path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._records: dict[str, dict] = {}
        self.duplicates_on_load = 0
        truncate_torn_tail(self.path)
        if self.path.exists():
            for number, row, problem in iter_jsonl_rows(self.path):   # bad bytes and JSON are problems, not errors
                if problem is not None or not isinstance(row, dict) or not isinstance(row.get("key"), str):
                    raise ConfigError(f"{self.path}:{number}: not a response-cache record; fix or remove "
                                      "the line (or use another --cache file)")
                if row["key"] in self._records:
                    self.duplicates_on_load += 1
                    continue
                self._records[row["key"]] = row
        self._appender = JsonlAppender(self.path)
        self._inflight: dict[str, threading.Lock] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def get(self, key: str) -> dict | None:
        return self._records.get(key)

    def put(self, record: dict) -> None:
        with self._lock:
            if record["key"] in self._records:
                return
            self._appender.append(record)
            self._records[record["key"]] = record

    def key_lock(self, key: str) -> threading.Lock:
        """One lock per key, so concurrent identical requests are sent once."""
        with self._lock:
            return self._inflight.setdefault(key, threading.Lock())

    def close(self) -> None:
        self._appender.close()


class CachedClient(ChatClient):
    """Answer from the cache when possible; otherwise ask ``client`` and append the answer at once."""

    def __init__(self, client: ChatClient, cache: ResponseCache):
        self.client = client
        self.cache = cache
        self.name = client.name
        self.concurrency = client.concurrency
        self.hits = 0
        self.misses = 0

    def _chat(self, messages, **params) -> str:
        key = request_key(self.name, messages, params)
        with self.cache.key_lock(key):
            row = self.cache.get(key)
            if row is None:
                self.misses += 1
                try:
                    answer = self.client._chat(messages, **params)
                except RequestRejected as e:  # deterministic: remember it, so a rerun does not ask again
                    self.cache.put({"key": key, "model": self.name, "messages": messages, "params": params,
                                    "error": str(e), "status": e.status})
                    raise
                row = {"key": key, "model": self.name, "messages": messages, "params": params, "answer": answer}
                self.cache.put(row)
            else:
                self.hits += 1
        if "error" in row:
            raise RequestRejected(row["error"], row.get("status"))
        return row["answer"]

    def cached(self, messages, **params) -> bool:
        full = {"temperature": 0.0, "max_tokens": 256, "top_p": 1.0, "seed": None, **params}
        return request_key(self.name, messages, full) in self.cache

    def close(self) -> None:
        self.client.close()


__all__ = ["CachedClient", "ResponseCache", "request_key"]
