"""The name under which a Hugging Face model takes its KV cache.

transformers 5.x renames ``past_key_values`` to ``cache`` (the old name warns and goes away in 5.40);
earlier releases know only ``past_key_values``. ``cache_kwargs`` reads the model's own ``forward``
signature (through a PEFT wrapper to the base model), so every release gets the name it expects.
"""

from __future__ import annotations

import inspect
from functools import lru_cache


@lru_cache(maxsize=None)
def _keyword(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for ``model(**inputs, **cache_kwargs(model, cache), use_cache=True)``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_keyword(type(base)): cache}
