"""Every teacher kind, and one way to read and open a ``teacher:`` setting.

- ``PATH`` or hub id: a model loaded into this process (``local.py``; every capability);
- ``cache:DIR``: top-k log-probabilities captured by ``lmdistill capture`` (``cache.py``; sequences fixed in
  advance: the dataset's responses, or a generated file used as data);
- ``openai:NAME@URL``: an OpenAI-compatible server (vLLM, ``lmdistill serve``) scoring sequences through the
  completions API (``served.py``; scores of sequences, not teacher tokens while generating);
- ``xtok:SOURCE``: a teacher with another tokenizer (any of the three above as SOURCE), reading the text in its own
  tokens, aligned to the student's by bytes (``cross_tokenizer.py``; the ``uld`` and ``gold`` terms read it).

A new kind is a :class:`~lmdistill.teachers.base.Teacher` subclass (its ``kind``, ``prefix``, ``capabilities``, an
``open(spec, **options)`` classmethod) and one line in :data:`KINDS`; :func:`teacher_kind` then reads its values,
:func:`capabilities_of` answers for it before anything loads, and :func:`open_teacher` opens it and checks what the
run asks of it.
"""

from __future__ import annotations

from lmdistill.teachers.base import Capabilities, Need, Teacher, check_use
from lmdistill.teachers.cache import TeacherCache
from lmdistill.teachers.cross_tokenizer import CrossTokenizerTeacher
from lmdistill.teachers.local import LocalTeacher
from lmdistill.teachers.served import ServedTeacher

#: ``kind -> class``; a value's kind is the class whose ``prefix`` it starts with (the local model: no prefix).
KINDS: dict[str, type[Teacher]] = {"local": LocalTeacher, "cache": TeacherCache, "served": ServedTeacher,
                                   "cross_tokenizer": CrossTokenizerTeacher}
LOCAL, CACHE, SERVED = "local", "cache", "served"


def teacher_kind(spec: str) -> str:
    """The kind of a ``teacher:`` value (``local`` for a folder, a hub id or ``""``); a malformed one is refused."""
    spec = (spec or "").strip()
    for kind, cls in KINDS.items():
        if cls.prefix and spec.startswith(cls.prefix):
            cls.check_spec_text(spec)
            return kind
    return LOCAL


def capabilities_of(spec: str) -> Capabilities:
    """What a teacher named by ``spec`` can give, known before it opens (a cache's temperature only once it does)."""
    return KINDS[teacher_kind(spec)].spec_capabilities(spec)


def check_spec(spec: str, needs: list[Need], where: str | None = None) -> None:
    """Refuse, before anything loads, a teacher ``spec`` whose kind cannot give what ``needs`` asks."""
    kind = teacher_kind(spec)
    check_use(kind, KINDS[kind].spec_capabilities(spec), needs, where or f"teacher: {spec}")


def open_teacher(spec: str, needs: list[Need] = (), where: str | None = None, **options) -> Teacher | None:
    """The teacher ``spec`` names, opened with the ``options`` its kind takes (``device``, ``dtype``, ``tokenizer``;
    a cache: ``expect``, the settings it must have been captured with; a server: ``top_k``, ``api``,
    ``cache_path``), checked against ``needs``. ``None`` for an empty spec."""
    if not spec:
        return None
    teacher = KINDS[teacher_kind(spec)].open(spec, **options)
    teacher.check(list(needs), where or f"teacher: {spec}")
    return teacher
