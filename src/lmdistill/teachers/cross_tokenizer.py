"""A teacher with another tokenizer: ``teacher: xtok:SOURCE`` (a model folder or hub id, ``openai:NAME@URL``, or
``cache:DIR`` captured with ``lmdistill capture --student ...``).

For each training row the teacher reads the conversation rendered with *its own* template (``teacher_template``:
``auto``, the default, is the teacher's chat template when its tokenizer has one, else the Alpaca template; ``alpaca``
or ``chat`` force one), encoded by its own tokenizer (its prompt prefix, e.g. Gemma's ``<bos>``, included), followed
by the response as text: the student's response tokens spelled as bytes (``byte_align.TokenBytes``), decoded,
re-tokenized by the teacher, plus the teacher's EOS where the student's response ends with its EOS. Each model thus
sees the prompt format it was trained with; rendering the teacher's prompt with the student's template (TRL GOLD
does, ``gold_trainer.py:2460``) cost +0.287 nats per token of the teacher's log-probabilities in tinker-cookbook #796.
Both token sequences of the response are grouped by byte offsets (``byte_align.align``) and the teacher's
distributions at its response tokens come back as an :class:`~lmdistill.losses.aligned.AlignedTeacher`, which the
``uld`` and ``gold`` terms read (``losses/uld.py``).

Sources: a model here gives full distributions (``aligned``); a server scores the teacher-side tokens with its top
``teacher_top_k`` log-probabilities plus each token's own (``aligned_top_k``; ``teacher_tokenizer=PATH`` names its
tokenizer, which this process needs to tokenize the text); a cache holds what a capture stored: the teacher's tokens,
their byte ends, their top-k and own log-probabilities (``cross_cache.py``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lmdistill.errors import ConfigError
from lmdistill.losses.aligned import AlignedTeacher
from lmdistill.losses.sparse import SparseTeacher
from lmdistill.models import load_model, load_tokenizer
from lmdistill.teachers.base import Capabilities, Teacher
from lmdistill.teachers.cache import TeacherCache
from lmdistill.teachers.cross_cache import CacheSource
from lmdistill.teachers.cross_rows import TEACHER_TEMPLATES, Source, TeacherRow, Tokenizers, flat_groups, model_logits
from lmdistill.teachers.served import ServedTeacher

PREFIX = "xtok:"


def inner_spec(spec: str) -> str:
    """The source of an ``xtok:`` value (what follows the prefix)."""
    return spec.strip()[len(PREFIX):].strip()


def source_kind(inner: str) -> str:
    return "served" if inner.startswith(ServedTeacher.prefix) else "cache" if inner.startswith(
        TeacherCache.prefix) else "local"


class LocalSource(Source):
    """A teacher model in this process: its logits at its response tokens."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.vocab = model.get_output_embeddings().weight.shape[0]

    def score(self, trows: list[TeacherRow]):
        return model_logits(self.model, trows, self.pad_id), None, None


class ServedSource(Source):
    """A server: the top-k of each teacher response token and that token's own log-probability (two requests per
    sequence: ``logprobs: K`` and ``logprobs: 0``; the top-k answers go through the served teacher's response cache)."""

    dense = False

    def __init__(self, served: ServedTeacher):
        self.served, self.vocab = served, None

    def score(self, trows: list[TeacherRow]):
        seqs = [r.prompt_ids + r.response_ids for r in trows]
        wanted = [list(range(len(r.prompt_ids), len(s))) for r, s in zip(trows, seqs)]
        sparse = self.served.sequence_scores(seqs, wanted)
        asked = [(s, w) for s, w in zip(seqs, wanted) if w]
        answers = self.served.client.token_logprobs_many([s for s, _ in asked], api=self.served.api) if asked else []
        own = [a[t] for (_, w), a in zip(asked, answers) for t in w]
        return None, sparse, torch.tensor(own, dtype=torch.float32)

    def close(self) -> None:
        self.served.close()


def check_cross_options(spec: str, *, teacher_tokenizer: str = "", teacher_template: str = "auto") -> None:
    """Refuse, before anything loads, settings of a cross-tokenizer teacher that cannot work (``ConfigError``)."""
    if teacher_template not in TEACHER_TEMPLATES:
        raise ConfigError(f"teacher_template: must be one of {', '.join(TEACHER_TEMPLATES)}, got {teacher_template!r}")
    xtok = bool(spec) and spec.strip().startswith(PREFIX)
    served = xtok and source_kind(inner_spec(spec)) == "served"
    if served and not teacher_tokenizer:
        raise ConfigError(f"teacher_tokenizer: teacher={spec} needs the server's tokenizer here (a folder or hub id: "
                          "teacher_tokenizer=PATH) to tokenize the text it scores")
    if teacher_tokenizer and not served:
        raise ConfigError("teacher_tokenizer: is read only with a served cross-tokenizer teacher "
                          "(teacher=xtok:openai:NAME@URL); a model folder and a cache bring their own tokenizer")
    if teacher_template != "auto" and not xtok:
        raise ConfigError("teacher_template: is read only with a cross-tokenizer teacher (teacher=xtok:...); a "
                          "same-tokenizer teacher reads the student's rows (template=)")


class CrossTokenizerTeacher(Teacher):
    """``xtok:SOURCE``: a teacher read through its own tokenizer and template, aligned to the student by bytes."""

    kind = "cross_tokenizer"
    prefix = PREFIX
    capabilities = Capabilities(aligned=True, aligned_top_k=True)

    @classmethod
    def check_spec_text(cls, spec: str) -> None:
        inner = inner_spec(spec)
        if not inner:
            raise ConfigError("teacher: xtok: needs a teacher after it, e.g. teacher=xtok:runs/models/gemma3, "
                              "xtok:openai:NAME@URL (with teacher_tokenizer=PATH) or xtok:cache:DIR")
        kind = source_kind(inner)
        if kind == "served":
            ServedTeacher.check_spec_text(inner)
        elif kind == "cache":
            TeacherCache.check_spec_text(inner)

    @classmethod
    def spec_capabilities(cls, spec: str) -> Capabilities:
        kind = source_kind(inner_spec(spec))
        if kind == "served":
            return Capabilities(aligned_top_k=True, temperatures=(1.0,))
        if kind == "cache":
            return Capabilities(aligned_top_k=True, new_sequences=False)
        return Capabilities(aligned=True)

    def __init__(self, source, tokenizers: Tokenizers, capabilities: Capabilities):
        self.source, self.tokenizers, self.capabilities = source, tokenizers, capabilities
        self.model = source.model
        self.tokenizer = tokenizers.teacher
        self.vocab = min(x for x in (source.vocab, len(tokenizers.teacher)) if x)

    @classmethod
    def open(cls, spec: str, *, tokenizer=None, teacher_tokenizer: str = "", teacher_template: str = "auto",
             device=None, dtype: str = "float32", top_k: int = 20, api: str = "echo", cache_path=None, **options):
        if tokenizer is None:
            raise ConfigError("teacher: a cross-tokenizer teacher needs the student's tokenizer")
        inner, caps = inner_spec(spec), cls.spec_capabilities(spec)
        kind = source_kind(inner)
        if kind == "cache":
            source, ttok, template = CacheSource.open(inner, tokenizer, expect=options.get("expect"))
            caps = replace(caps, temperatures=(source.temperature,))   # known once it opens
            return cls(source, Tokenizers(tokenizer, ttok, template), caps)
        if kind == "served":
            if not teacher_tokenizer:
                raise ConfigError(f"teacher: {spec}: a served cross-tokenizer teacher needs teacher_tokenizer=PATH "
                                  "(the server's tokenizer, a folder or hub id) to tokenize the text it scores")
            source = ServedSource(ServedTeacher.open(inner, top_k=top_k, api=api, cache_path=cache_path))
            ttok = load_tokenizer(teacher_tokenizer)
        else:
            ttok = load_tokenizer(teacher_tokenizer or inner)
            model = load_model(inner, dtype=dtype, device=None if device is None else str(device))
            source = LocalSource(model, ttok.pad_token_id if ttok.pad_token_id is not None else 0)
        return cls(source, Tokenizers(tokenizer, ttok, teacher_template), caps)

    def rows(self, rows) -> list[TeacherRow]:
        """The student ``rows`` in this teacher's tokens, with their byte groups."""
        return self.source.rows(rows, self.tokenizers)

    def aligned(self, rows, batch: dict) -> AlignedTeacher:
        """The teacher's distributions on its own tokens of the rows' text, grouped with the student's tokens."""
        trows = self.rows(rows)
        expected = int(batch["loss_mask"][:, 1:].sum())
        if sum(r.student_len for r in trows) != expected:
            raise ConfigError(f"teacher: {sum(r.student_len for r in trows)} student response tokens in the rows, "
                              f"the batch trains {expected}")
        logits, sparse, own = self.source.score(trows) if any(r.response_ids for r in trows) else self._empty()
        one, total = sum(r.bytes_one_to_one for r in trows), sum(r.bytes_total for r in trows)
        return AlignedTeacher(flat_groups(trows), torch.tensor([t for r in trows for t in r.response_ids],
                                                               dtype=torch.long),
                              logits=logits, sparse=sparse, token_logprobs=own,
                              matching=(lambda: self.tokenizers.matched) if self.source.dense else None,
                              vocab=(len(self.tokenizers.student), self.vocab), coverage=one / total if total else 1.0)

    def _empty(self):
        if self.source.dense:
            return torch.zeros(0, self.vocab), None, None
        return None, SparseTeacher(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1), torch.zeros(0),
                                   self.source.temperature, self.vocab), torch.zeros(0)

    def close(self) -> None:
        self.source.close()
