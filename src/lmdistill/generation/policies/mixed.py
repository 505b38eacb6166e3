"""``mixed``: per sequence, the student's sample with probability ``student_prob``, else the gold response
(GKD's on-policy fraction, ImitKD), or the teacher's sample when a row has no gold or ``off_policy`` is
``teacher``.

With ``coin: batch`` (the default, as TRL's ``GKDTrainer.training_step`` draws ``random.random() <= lmbda``
once per call and the GKD paper's Algorithm 1 once per batch) the first row's coin decides for every row: the
batch is all student samples or all gold; ``coin: sequence`` flips one coin per row. The coins come from
the rows' noise keys, so they are as reproducible as the tokens. Gold responses
are kept whole (``max_new_tokens`` bounds sampling, not the dataset's answer: an off-policy row trains on the
complete gold response, as GKD's and ImitKD's off-policy batches do) and tagged 1 (off-policy, like teacher
tokens); ``stats["origin"]`` tells ``student``, ``gold`` or ``teacher`` apart.

``off_policy: teacher`` is TRL's ``seq_kd=True`` (trl/experimental/gkd/gkd_trainer.py:501-528, commit
f2cd577): ``if random.random() <= lmbda`` the student generates, ``elif seq_kd`` the teacher generates with the
same generation config, else the batch keeps its gold responses; the same loss then trains on whichever sequences
came out. The student's coin is drawn first, so with it the student's share stays ``student_prob`` and the
teacher writes the rest (no gold is used). The teacher's rows are exactly the ``teacher`` policy's sample for the
same noise keys.
"""

from __future__ import annotations

import torch

from dataclasses import dataclass, field

from lmdistill.errors import ConfigError
from lmdistill.generation.batch import PADDING, TEACHER, Batch, Decoded
from lmdistill.generation.policies import student as student_policy
from lmdistill.generation.policies import teacher as teacher_policy
from lmdistill.generation.policies.base import Policy

COIN_STREAM = 0x5EED


@dataclass(frozen=True)
class MixedParams:
    """``student_prob``: the student's share (GKD's lambda); ``coin``: ``batch`` (one coin for the batch, as TRL)
    or ``sequence``; ``off_policy``: what a row that loses the coin trains on, ``gold`` or ``teacher`` (TRL's
    ``seq_kd``)."""

    student_prob: float = field(default=0.5, metadata={"help": "probability of the student's sample (GKD's lambda)"})
    coin: str = field(default="batch", metadata={"help": "batch: one coin for the whole batch (TRL); sequence: one "
                                                          "per row"})
    off_policy: str = field(default="gold", metadata={"help": "what a row that loses the coin trains on: gold, or "
                                                               "teacher (TRL's seq_kd)"})

    def __post_init__(self):
        if not (isinstance(self.student_prob, (int, float)) and 0 <= self.student_prob <= 1):
            raise ConfigError(f"student_prob: must be in [0, 1], got {self.student_prob!r}")
        if self.coin not in ("batch", "sequence"):
            raise ConfigError(f"coin: must be 'batch' or 'sequence', got {self.coin!r}")
        if self.off_policy not in ("gold", "teacher"):
            raise ConfigError(f"off_policy: must be 'gold' or 'teacher' (TRL's seq_kd), got {self.off_policy!r}")


def needs(params: MixedParams, all_gold: bool = True) -> tuple[str, ...]:
    """``mixed`` may ask the teacher for a sample: some rows can lose the student's coin (``student_prob < 1``)
    and then need it (``off_policy: teacher``, or a row without gold)."""
    return ("steps",) if params.student_prob < 1 and (params.off_policy == "teacher" or not all_gold) else ()


def run(student, teacher, batch: Batch) -> Decoded:
    dev, params = batch.device, batch.params
    coins = batch.noise.uniform(0, COIN_STREAM)[:, 0].tolist()
    if params.coin == "batch":
        coins = [coins[0]] * len(coins)
    origin = []
    for b, u in enumerate(coins):
        has_gold = batch.gold is not None and batch.gold[b] is not None
        off = "gold" if has_gold and params.off_policy == "gold" else "teacher"
        origin.append("student" if u < params.student_prob else off)
    gold_len = max((len(batch.gold[b]) for b, o in enumerate(origin) if o == "gold"), default=0)
    n = max(batch.max_new_tokens, gold_len)
    tokens = torch.full((batch.size, n), batch.pad_id, dtype=torch.long, device=dev)
    sources = torch.full((batch.size, n), PADDING, dtype=torch.long, device=dev)
    lengths = torch.zeros(batch.size, dtype=torch.long, device=dev)
    for name, policy in (("student", student_policy.run), ("teacher", teacher_policy.run)):
        rows = [b for b, o in enumerate(origin) if o == name]
        if rows:
            part = policy(student, teacher, batch.subset(rows))
            idx = torch.tensor(rows, device=dev)
            w = part.tokens.shape[1]
            tokens[idx, :w], sources[idx, :w] = part.tokens.to(dev), part.sources.to(dev)
            lengths[idx] = part.lengths.to(dev)
    for b, o in enumerate(origin):
        if o == "gold":
            ids = batch.gold[b]
            tokens[b, :len(ids)] = torch.tensor(ids, dtype=torch.long, device=dev)
            sources[b, :len(ids)] = TEACHER
            lengths[b] = len(ids)
    return Decoded(tokens, lengths, sources, [{"origin": o} for o in origin])


POLICY = Policy("mixed", run, MixedParams, needs=needs, aliases={"student_prob": ["--mix-lambda"]})
