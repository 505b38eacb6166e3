"""``student``: on-policy sampling from the student (GKD, ImitKD, DistiLLM, MiniLLM data)."""

from __future__ import annotations

from lmdistill.generation.batch import STUDENT, Batch, Decoded, source_tags
from lmdistill.generation.decode import sample_loop
from lmdistill.generation.policies.base import Policy


def run(student, teacher, batch: Batch) -> Decoded:
    lm = batch.runner(student)
    tokens, lengths = sample_loop(lm, lm.prefill(), batch)
    return Decoded(tokens, lengths, source_tags(lengths, batch.max_new_tokens, STUDENT))


POLICY = Policy("student", run)
