"""What a ``teacher:`` setting names: a local model, an offline cache, or a served model.

- ``PATH`` or hub id: a model loaded into the training process (every method);
- ``cache:DIR``: top-k log-probabilities captured by ``lmdistill capture`` (methods whose sequences are fixed in
  advance: the dataset's responses, or a generated file used as data);
- ``openai:NAME@URL``: an OpenAI-compatible server (vLLM, ``lmdistill serve``) scoring each new sequence through the
  completions API (methods that need teacher scores of sequences, not teacher tokens while generating).
"""

from __future__ import annotations

from lmdistill.errors import ConfigError

LOCAL, CACHE, SERVED = "local", "cache", "served"


def teacher_kind(spec: str) -> str:
    """``local``, ``cache`` or ``served`` for a ``teacher:`` value (``""``: no teacher, reported as local)."""
    spec = (spec or "").strip()
    if spec.startswith("cache:"):
        if not spec[len("cache:"):]:
            raise ConfigError("teacher: cache: needs a folder, e.g. teacher=cache:runs/teacher-cache")
        return CACHE
    if spec.startswith("openai:"):
        body = spec[len("openai:"):]
        name, sep, url = body.rpartition("@")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ConfigError(f"teacher: {spec!r} should be openai:MODEL@BASE_URL, "
                              "e.g. openai:teacher@http://127.0.0.1:8000/v1")
        return SERVED
    return LOCAL


def cache_dir(spec: str) -> str:
    return spec.strip()[len("cache:"):]
