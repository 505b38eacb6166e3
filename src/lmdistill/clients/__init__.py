"""Model clients and the response cache, shared by quantification and evaluation.

- ``base``: the ``ChatClient`` interface, its errors (``ClientError`` and subclasses), ``RetryPolicy``.
- ``cache``: the crash-safe response cache (``ResponseCache``, ``CachedClient``).
- ``chat``: ``make_client(spec)`` for OpenAI-compatible endpoints and local Hugging Face models.

Layering: this package sits above ``lmdistill.decoding`` and ``lmdistill.models`` (a local client runs a
``ChatEngine``), beside ``lmdistill.serve`` (neither imports the other), and below ``lmdistill.quantify``,
``lmdistill.evaluate`` and ``lmdistill.teachers``.
"""

from lmdistill.clients.base import (AuthenticationFailed, ChatClient, ClientError, RequestRejected, RetriesExhausted,
                                    RetryPolicy)
from lmdistill.clients.cache import CachedClient, ResponseCache
from lmdistill.clients.chat import LocalChatClient, OpenAIChatClient, make_client

__all__ = ["AuthenticationFailed", "CachedClient", "ChatClient", "ClientError", "LocalChatClient", "OpenAIChatClient",
           "RequestRejected", "ResponseCache", "RetriesExhausted", "RetryPolicy", "make_client"]
