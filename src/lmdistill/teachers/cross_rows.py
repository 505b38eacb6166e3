"""A student row in a cross-tokenizer teacher's tokens: its template, its tokenizer, the byte groups.

``Tokenizers(student, teacher, template).row(row)`` renders the row's conversation with the teacher's template
(``teacher_template``), encodes it with the teacher's tokenizer (its prompt prefix included), spells the student's
response tokens as text, re-tokenizes that text for the teacher (its EOS after a student EOS) and groups both
response tokenizations by byte offsets (:mod:`.byte_align`). ``flat_groups`` lays the groups of a micro-batch out
row-major, as the terms' ``[N, V]`` logits and the teacher's scored positions are. A :class:`Source` is where an
``xtok:`` teacher's scores come from (a model here: :func:`model_logits`; a server; a cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmdistill.data.collate import collate_for_training
from lmdistill.data.prompt_prefix import encode_prompts
from lmdistill.data.templates import format_prompt, has_chat_template
from lmdistill.data.tokenize import TokenizedExample
from lmdistill.errors import ConfigError
from lmdistill.losses.model_forward import selected_logits
from lmdistill.teachers.byte_align import (TokenBytes, align, matched_ids, one_to_one_bytes, student_text,
                                           teacher_ends)

TEACHER_TEMPLATES = ("auto", "alpaca", "chat")


def teacher_template(template: str, tokenizer) -> str:
    """The template the teacher's prompts use: ``auto`` = chat when its tokenizer has a chat template, else alpaca."""
    if template not in TEACHER_TEMPLATES:
        raise ConfigError(f"teacher_template: must be one of {', '.join(TEACHER_TEMPLATES)}, got {template!r}")
    if template == "chat" and not has_chat_template(tokenizer):
        raise ConfigError("teacher_template: chat needs a chat template, and the teacher's tokenizer has none; use "
                          "teacher_template=alpaca")
    if template == "auto":
        return "chat" if has_chat_template(tokenizer) else "alpaca"
    return template


@dataclass
class TeacherRow:
    """One row in the teacher's tokens: its prompt and response ids, the response tokens' byte ends, and the groups
    ``(s0, s1, t0, t1)`` of the student's and its response tokens (row-local)."""

    prompt_ids: list[int]
    response_ids: list[int]
    ends: list[int]
    groups: list[tuple[int, int, int, int]]
    student_len: int
    bytes_one_to_one: int = 0
    bytes_total: int = 0
    ref: tuple | None = None    # where a cache holds its scores


class Tokenizers:
    """The two tokenizers, their token bytes, the teacher's template and the vocabulary matches (made once)."""

    def __init__(self, student, teacher, template: str):
        self.student, self.teacher = student, teacher
        self.student_bytes, self.teacher_bytes = TokenBytes(student), TokenBytes(teacher)
        self.template = teacher_template(template, teacher)
        self._matched = None

    @property
    def matched(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._matched is None:
            t_ids, s_ids = matched_ids(self.student, self.teacher, self.student_bytes, self.teacher_bytes)
            self._matched = (torch.tensor(t_ids, dtype=torch.long), torch.tensor(s_ids, dtype=torch.long))
        return self._matched

    def response(self, response_ids: list[int], where: str) -> tuple[list[int], list[int], list[int]]:
        """``(student ends, teacher ids, teacher ends)`` of one response (teacher EOS after a student EOS)."""
        text, s_ends = student_text([self.student_bytes(t) for t in response_ids])
        # the response is text: a literal "<eos>" in it is read as characters, never as the teacher's special token
        t_ids = list(self.teacher(text, add_special_tokens=False, split_special_tokens=True, verbose=False)[
            "input_ids"]) if text else []
        t_ends = teacher_ends(t_ids, text, self.teacher_bytes, where)
        eos_s, eos_t = self.student.eos_token_id, self.teacher.eos_token_id
        if response_ids and response_ids[-1] == eos_s and eos_t is not None:
            t_ids, t_ends = t_ids + [eos_t], t_ends + [t_ends[-1] if t_ends else 0]
        return s_ends, t_ids, t_ends

    def row(self, row) -> TeacherRow:
        """The teacher's view of a student row (a ``TokenizedExample`` with its example)."""
        where = f"teacher: row {row.id!r}"
        if row.example is None:
            raise ConfigError(f"{where} has no example text (replayed rows do not keep it); a cross-tokenizer teacher "
                              "renders each row's conversation itself")
        prompt = encode_prompts([format_prompt(row.example, self.template, self.teacher)], self.teacher)[0]
        s_ends, t_ids, t_ends = self.response(list(row.response_ids), where)
        groups = align(s_ends, t_ends)
        one, total = one_to_one_bytes(groups, s_ends)
        return TeacherRow(prompt, t_ids, t_ends, groups, len(row.response_ids), one, total)


def flat_groups(trows: list[TeacherRow]) -> torch.Tensor:
    """Every row's groups with row-major flat offsets on both sides, ``[G, 4]``."""
    out, s_off, t_off = [], 0, 0
    for r in trows:
        out += [(s0 + s_off, s1 + s_off, t0 + t_off, t1 + t_off) for s0, s1, t0, t1 in r.groups]
        s_off, t_off = s_off + r.student_len, t_off + len(r.response_ids)
    return torch.tensor(out, dtype=torch.long).reshape(-1, 4)


@torch.no_grad()
def model_logits(model, trows: list[TeacherRow], pad_id: int) -> torch.Tensor:
    """A teacher model's logits ``[M, V]`` predicting each of its response tokens (row-major over ``trows``)."""
    rows = [TokenizedExample(str(i), r.prompt_ids, r.response_ids) for i, r in enumerate(trows)]
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_for_training(rows, pad_id).items()}
    return selected_logits(model, batch, batch["loss_mask"][:, 1:])


class Source:
    """Where an ``xtok:`` teacher's scores come from: ``rows`` (the student rows in the teacher's tokens) and
    ``score`` (``(logits [M, V], None, None)`` when ``dense``, else ``(None, SparseTeacher, own log-probs [M])``)."""

    dense = True
    model = None
    vocab: int | None = None
    temperature = 1.0   # of a sparse source's scores

    def rows(self, rows, tokenizers: Tokenizers) -> list[TeacherRow]:
        return [tokenizers.row(r) for r in rows]

    def close(self) -> None:
        pass
