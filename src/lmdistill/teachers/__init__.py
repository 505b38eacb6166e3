"""The teacher type (``base.py``) and its kinds: a model in this process (``local.py``), an offline top-k cache
(``lmdistill capture``, ``teacher: cache:DIR``; ``cache.py``) and a served teacher (``teacher: openai:NAME@URL``;
``served.py``), opened by ``open.py``; several teachers routed per row (``routed.py``) or mixed (``mixture.py``); a
teacher of another tokenizer read by bytes (``teacher: xtok:SOURCE``; ``cross_tokenizer.py``)."""

from lmdistill.teachers.base import Capabilities, Need, Teacher, check_use
from lmdistill.teachers.cache import TeacherCache, cache_dir
from lmdistill.teachers.cross_tokenizer import CrossTokenizerTeacher
from lmdistill.teachers.fingerprint import examples_hash, model_fingerprint, row_key, tokenizer_hash
from lmdistill.teachers.local import LocalTeacher
from lmdistill.teachers.mixture import MixedTeacher
from lmdistill.teachers.open import CACHE, KINDS, LOCAL, SERVED, capabilities_of, check_spec, open_teacher, teacher_kind
from lmdistill.teachers.routed import RoutedTeacher
from lmdistill.teachers.served import ServedTeacher

__all__ = ["CACHE", "Capabilities", "CrossTokenizerTeacher", "KINDS", "LOCAL", "LocalTeacher", "MixedTeacher", "Need", "RoutedTeacher",
           "SERVED", "ServedTeacher", "Teacher", "TeacherCache", "cache_dir", "capabilities_of", "check_spec",
           "check_use", "examples_hash", "model_fingerprint", "open_teacher", "row_key", "teacher_kind",
           "tokenizer_hash"]
