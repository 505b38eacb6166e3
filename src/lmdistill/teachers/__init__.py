"""The teacher type (``base.py``) and its kinds: a model in this process (``local.py``), an offline top-k cache
(``lmdistill capture``, ``teacher: cache:DIR``; ``cache.py``) and a served teacher (``teacher: openai:NAME@URL``;
``served.py``), opened by ``open.py``."""

from lmdistill.teachers.base import Capabilities, Need, Teacher, check_use
from lmdistill.teachers.cache import TeacherCache, cache_dir
from lmdistill.teachers.fingerprint import examples_hash, model_fingerprint, row_key, tokenizer_hash
from lmdistill.teachers.local import LocalTeacher
from lmdistill.teachers.open import CACHE, KINDS, LOCAL, SERVED, capabilities_of, check_spec, open_teacher, teacher_kind
from lmdistill.teachers.served import ServedTeacher

__all__ = ["CACHE", "Capabilities", "KINDS", "LOCAL", "LocalTeacher", "Need", "SERVED", "ServedTeacher", "Teacher",
           "TeacherCache", "cache_dir", "capabilities_of", "check_spec", "check_use", "examples_hash",
           "model_fingerprint", "open_teacher", "row_key", "teacher_kind", "tokenizer_hash"]
