"""Vocabulary alignment between a teacher and a student that share a tokenizer.

Models of one family often pad their embedding / LM-head matrices to a multiple of some number
(Qwen2.5 7B has 152064 rows, 0.5B has 151936, for the same 151665-token tokenizer).  The extra
rows are never produced by the tokenizer, so the two distributions are compared on the shared
prefix of the vocabulary.

What counts as "padding only" (anything else raises :class:`LossInputError`):

* the leading shapes (batch, sequence, ...) are identical, and
* if ``vocab_size`` (the tokenizer's length) is given: both vocabularies have at least
  ``vocab_size`` rows, i.e. every extra row lies beyond the tokenizer; otherwise
* the two sizes differ by at most :data:`MAX_VOCAB_PADDING` rows.

A mismatch is reported once per (student size, teacher size) pair, with ``warnings.warn`` and
the ``lmdistill.losses`` logger.
"""

from __future__ import annotations

import logging
import warnings

import torch

from lmdistill.errors import LmdistillError

logger = logging.getLogger("lmdistill.losses")

#: Largest vocabulary-size difference accepted as padding when no tokenizer length is given.
MAX_VOCAB_PADDING = 1024

_warned: set[tuple[int, int]] = set()


class LossInputError(LmdistillError, ValueError):
    """Logits, masks or labels given to a loss have shapes or values that cannot be compared."""


def shared_vocab(student_vocab: int, teacher_vocab: int, *, vocab_size: int | None = None) -> int:
    """Return the number of vocabulary rows both models are compared on (the shared prefix).

    Warns once per size pair when the sizes differ; raises :class:`LossInputError` when the
    difference is not padding (see the module docstring).
    """
    if student_vocab == teacher_vocab:
        if vocab_size is not None and student_vocab < vocab_size:
            raise LossInputError(f"logits have {student_vocab} vocabulary entries but the tokenizer has {vocab_size}")
        return student_vocab
    shared = min(student_vocab, teacher_vocab)
    if vocab_size is not None:
        if shared < vocab_size:
            raise LossInputError(
                f"vocabulary mismatch is not padding: student has {student_vocab} entries, teacher has "
                f"{teacher_vocab}, but the tokenizer has {vocab_size} tokens (both need at least that many)")
    elif abs(student_vocab - teacher_vocab) > MAX_VOCAB_PADDING:
        raise LossInputError(
            f"vocabulary mismatch is not padding: student has {student_vocab} entries, teacher has "
            f"{teacher_vocab} (differ by more than {MAX_VOCAB_PADDING}); do they share a tokenizer?")
    key = (student_vocab, teacher_vocab)
    if key not in _warned:
        _warned.add(key)
        bigger = "teacher" if teacher_vocab > student_vocab else "student"
        msg = (f"student vocabulary has {student_vocab} entries and teacher has {teacher_vocab}: treating the "
               f"{bigger}'s extra rows as padding and comparing on the first {shared} entries")
        logger.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
    return shared


def align_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check leading shapes and cut both logits to the shared vocabulary prefix (views, no copy)."""
    if not isinstance(student_logits, torch.Tensor) or not isinstance(teacher_logits, torch.Tensor):
        raise LossInputError("student_logits and teacher_logits must be tensors")
    if student_logits.dim() == 0 or teacher_logits.dim() == 0:
        raise LossInputError("logits need at least one dimension (the vocabulary)")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise LossInputError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ outside the vocabulary dimension")
    v = shared_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size=vocab_size)
    if student_logits.shape[-1] != v:
        student_logits = student_logits[..., :v]
    if teacher_logits.shape[-1] != v:
        teacher_logits = teacher_logits[..., :v]
    return student_logits, teacher_logits
