"""The decoding service of a local causal LM: what ``lmdistill serve`` and the local chat client generate with.

- ``engine``: ``ChatEngine``, text in and out: chat template, prompt encoding and the context bound, stop
  strings, holdback, multi-byte characters; ``Completion``, ``ContextLengthError``.
- ``decoder``: the token source under it: each request alone (``solo_steps``) or through the ``batcher``
  (continuous batching, its KV rows in ``slots``).
- ``sampler`` (how a token is chosen), ``scoring`` (``TokenLogprob``, ``score_rows``), ``handle`` (the model,
  its forward lock and stop tokens, shared by both token sources), ``token_text`` (a token's text and bytes).

Evaluation does not decode here: its local models sample through ``lmdistill.generation`` (row-keyed noise,
independent of batching), and its API models, like quantification's, go through ``lmdistill.clients``.
"""

from lmdistill.decoding.batcher import BatchError, Batcher, QueueFull
from lmdistill.decoding.engine import ChatEngine, Completion, ContextLengthError
from lmdistill.decoding.scoring import TokenLogprob, score_rows

__all__ = ["BatchError", "Batcher", "ChatEngine", "Completion", "ContextLengthError", "QueueFull", "TokenLogprob",
           "score_rows"]
