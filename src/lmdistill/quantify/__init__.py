"""Distillation quantification (arXiv 2501.12619): ICE, RSE, white-box degree, and model clients.

- ``clients``: ``make_client(spec)`` for OpenAI-compatible endpoints and local HF models.
- ``cache``: the crash-safe response cache (``ResponseCache``, ``CachedClient``).
- ``ice``: identity consistency evaluation (GPTFuzz search with MCTS-Explore, loose/strict/hard scores).
- ``identity`` / ``judges``: the rule-based and LLM identity judges, agreement with the labelled set.
- ``rse`` / ``similarity``: response similarity, LLM-judged and judge-free.
- ``whitebox``: teacher-student KL and top-1 agreement for local pairs.
- ``report``: markdown tables and PNG charts.
"""

from lmdistill.quantify.clients import (AuthenticationFailed, ChatClient, ClientError, RequestRejected,
                                        RetriesExhausted, RetryPolicy, make_client)

__all__ = ["AuthenticationFailed", "ChatClient", "ClientError", "RequestRejected", "RetriesExhausted", "RetryPolicy",
           "make_client"]
