"""``teacher``: sampling from the teacher (SeqKD data)."""

from __future__ import annotations

from lmdistill.generation.batch import TEACHER, Batch, Decoded, source_tags
from lmdistill.generation.decode import sample_loop
from lmdistill.generation.policies.base import Policy


def run(student, teacher, batch: Batch) -> Decoded:
    lm = batch.runner(teacher)
    tokens, lengths = sample_loop(lm, lm.prefill(), batch)
    return Decoded(tokens.to(batch.device), lengths.to(batch.device),
                   source_tags(lengths.to(batch.device), batch.max_new_tokens, TEACHER))


POLICY = Policy("teacher", run, teacher=("steps",))
