"""Teachers outside the training process: an offline top-k cache (``lmdistill capture``, ``teacher: cache:DIR``) and
a served teacher (``teacher: openai:NAME@URL``). Both give ``sparse_scores(rows, batch)``, the top-k
log-probabilities the sparse divergences (:mod:`lmdistill.losses.sparse`) take."""

from lmdistill.teachers.cache import TeacherCache
from lmdistill.teachers.fingerprint import examples_hash, model_fingerprint, row_key, tokenizer_hash
from lmdistill.teachers.spec import CACHE, LOCAL, SERVED, cache_dir, teacher_kind

__all__ = ["CACHE", "LOCAL", "SERVED", "TeacherCache", "cache_dir", "examples_hash", "model_fingerprint", "row_key",
           "teacher_kind", "tokenizer_hash"]
