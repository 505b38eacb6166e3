"""Many independent requests at once, for ICE, RSE and the LLM judges.

The quantify tests send their requests in rounds: the mutations of a round, the target's answers to every
question of a round's mutants, the judge's loose questions of those answers, then the re-asks and strict
questions. A round goes out through ``ChatClient.chat_many``, which keeps ``concurrency`` requests in flight:
an API client's thread pool, or the batch of a local model (``LocalChatClient``'s ``concurrency`` is the batch
size of its engine), so a round decodes as one batch instead of one request after another.

What stays as in the one-at-a-time path:

- the requests: every request of a round is the one the sequential path sends (same messages, parameters and
  request seed), so the cache keys, the answers and the results are the same; only the order in which they
  reach the model differs.
- the cache: ``CachedClient`` answers a request from the cache when it can and appends each new answer the
  moment it arrives, under a per-key lock, so a rerun after kill -9 sends only the requests that have no answer
  and nothing is paid twice. Identical requests within a round are sent once here even without a cache.
- errors: a deterministic rejection (``RequestRejected``) stays with its request; any other failure (an outage)
  is raised once the whole round has finished, so what did get answered is cached before the run stops.
"""

from __future__ import annotations

import json
from typing import Sequence

from lmdistill.clients import ClientError, RequestRejected
from lmdistill.clients.base import answer_each


def _key(messages: list[dict], params: dict) -> str:
    return json.dumps([messages, params], sort_keys=True, ensure_ascii=False)


def chat_each(client, requests: Sequence[tuple[list[dict], dict]], *, progress: str | None = None) -> list:
    """The answer to each ``(messages, params)`` request, in order; a failed one gives its ``ClientError``.

    Identical requests are sent once. When all requests share their parameters this is one ``chat_many``;
    otherwise (e.g. one request seed per mutation) the same bounded pool over ``client.chat``.
    """
    keys = [_key(m, p) for m, p in requests]
    where: dict[str, int] = {}
    unique: list[tuple[list[dict], dict]] = []
    for k, req in zip(keys, requests):
        if k not in where:
            where[k] = len(unique)
            unique.append(req)
    if not unique:
        return []
    if len({json.dumps(p, sort_keys=True) for _, p in unique}) == 1:
        answers = client.chat_many([m for m, _ in unique], return_exceptions=True, progress=progress, **unique[0][1])
    else:
        answers = _pool(client, unique, progress)
    return [answers[where[k]] for k in keys]


def chat_unique(client, batch: Sequence[list[dict]], *, progress: str | None = None, **params) -> list:
    """``chat_each`` of every message list in ``batch`` with the same ``params``."""
    return chat_each(client, [(m, params) for m in batch], progress=progress)


def _pool(client, requests: list[tuple[list[dict], dict]], progress: str | None) -> list:
    return answer_each(lambda i: client.chat(requests[i][0], **requests[i][1]), len(requests),
                       getattr(client, "concurrency", 1), progress)


def raise_outage(answers: Sequence) -> None:
    """Raise the first failure that is not a deterministic rejection (the run stops; a rerun resumes)."""
    for a in answers:
        if isinstance(a, ClientError) and not isinstance(a, RequestRejected):
            raise a
