"""``mixed``: per sequence, the student's sample with probability ``mixed_student_prob``, else the gold response
(GKD's on-policy fraction, ImitKD), or the teacher's sample when a row has no gold.

The coin of each row comes from its noise key, so it is as reproducible as the tokens. Gold responses
are cut to ``max_new_tokens`` and tagged 1 (off-policy, like teacher tokens); ``stats["origin"]``
tells ``student``, ``gold`` or ``teacher`` apart.
"""

from __future__ import annotations

import torch

from lmdistill.generation.batch import PADDING, TEACHER, Batch, Decoded
from lmdistill.generation.policies import student as student_policy
from lmdistill.generation.policies import teacher as teacher_policy

COIN_STREAM = 0x5EED


def run(student, teacher, batch: Batch) -> Decoded:
    n, dev = batch.max_new_tokens, batch.device
    coins = batch.noise.uniform(0, COIN_STREAM)[:, 0].tolist()
    origin = []
    for b, u in enumerate(coins):
        has_gold = batch.gold is not None and batch.gold[b] is not None
        origin.append("student" if u < batch.config.mixed_student_prob else "gold" if has_gold else "teacher")
    tokens = torch.full((batch.size, n), batch.pad_id, dtype=torch.long, device=dev)
    sources = torch.full((batch.size, n), PADDING, dtype=torch.long, device=dev)
    lengths = torch.zeros(batch.size, dtype=torch.long, device=dev)
    for name, policy in (("student", student_policy.run), ("teacher", teacher_policy.run)):
        rows = [b for b, o in enumerate(origin) if o == name]
        if rows:
            part = policy(student, teacher, batch.subset(rows))
            idx = torch.tensor(rows, device=dev)
            tokens[idx], sources[idx], lengths[idx] = part.tokens.to(dev), part.sources.to(dev), part.lengths.to(dev)
    for b, o in enumerate(origin):
        if o == "gold":
            ids = batch.gold[b][:n]
            tokens[b, :len(ids)] = torch.tensor(ids, dtype=torch.long, device=dev)
            sources[b, :len(ids)] = TEACHER
            lengths[b] = len(ids)
    return Decoded(tokens, lengths, sources, [{"origin": o} for o in origin])
