"""Where the distilled sequences come from: the recipe's ``policy`` as a source of training batches.

A source has ``build(rows, step=, micro=, rank=, student=, teacher=, tokenizer=)`` -> :class:`SequenceBatch`, and
may carry state across steps (``state()`` / ``load_state()``, saved in checkpoints) and react to validation
(``observe_validation(metrics)``). The trainer calls only these, so it knows no policy by name.

- ``gold``: the dataset's responses (the gold batch itself; one student forward serves every term);
- ``student``, ``teacher``, ``mixed``, ``switch``, ``scrg``, ``teacher_mix``: the sequence engine
  (``lmdistill.generation``), sampling with the recipe's ``sampling:`` settings;
- ``replay``: DistiLLM's adaptive off-policy scheme (``replay.py``).

Every sequence becomes a right-padded batch, so the objective sees one layout for gold and generated rows: gold
and replayed rows through ``collate_for_training``, generated rows as the engine's own output
(``GenerationOutput.right_padded``, the same layout without re-collating). Off-policy rows of ``mixed`` carry the
whole gold response (the engine keeps it whole).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from lmdistill.data.collate import collate_for_training
from lmdistill.data.tokenize import TokenizedExample
from lmdistill.generation import generate
from lmdistill.train.data_order import step_seed
from lmdistill.train.replay import ReplayBuffer


@dataclass
class SequenceBatch:
    batch: dict                       # collate_for_training output
    rows: list[TokenizedExample]
    stats: dict = field(default_factory=dict)          # means over rows, logged as metrics
    row_stats: list[dict] = field(default_factory=list)   # the engine's per-row statistics (origin, ...)
    is_gold: bool = False             # the batch is the step's gold rows themselves


def summarise_stats(stats: list[dict]) -> dict:
    """Mean of the numeric per-sequence statistics (teacher-token fraction, correction position, ...)."""
    sums: dict[str, list[float]] = {}
    for s in stats:
        for k, v in s.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                sums.setdefault(k, []).append(float(v))
            elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v) and k != "jsd_trace":
                sums.setdefault(k, []).append(float(sum(v)) / len(v))
    return {f"gen/{k}": sum(v) / len(v) for k, v in sums.items()}


class GoldSequences:
    """The dataset's responses."""

    def __init__(self, cfg):
        self.cfg = cfg

    def gold(self, rows, tokenizer, stats: dict | None = None) -> SequenceBatch:
        return SequenceBatch(collate_for_training(rows, tokenizer.pad_token_id), rows, stats or {}, is_gold=True)

    def build(self, rows, *, step, micro, rank, student, teacher, tokenizer) -> SequenceBatch:
        return self.gold(rows, tokenizer)

    def state(self) -> dict | None:
        return None

    def load_state(self, state: dict | None) -> None:
        pass

    def observe_validation(self, metrics: dict) -> None:
        pass

    #: The trainer validates once before the first step when a source sets this.
    needs_initial_validation = False

    @classmethod
    def generator_policy(cls, cfg) -> str | None:
        """The engine policy this source samples with (``None``: it samples nothing); the config asks it whether
        a teacher is needed."""
        return None


class GeneratedSequences(GoldSequences):
    """Sequences from the engine's policy ``policy`` on the rows' prompts."""

    def __init__(self, cfg, policy: str | None = None):
        super().__init__(cfg)
        self.policy = policy or cfg.policy

    @classmethod
    def generator_policy(cls, cfg) -> str | None:
        return cfg.policy

    def generated(self, rows, seed: int, student, teacher, tokenizer, extra: dict | None = None) -> SequenceBatch:
        out = generate(student, [r.prompt_ids for r in rows], policy=self.policy, teacher=teacher,
                       gold=[r.response_ids for r in rows], config=self.cfg.sampling_config(seed),
                       pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
        new_rows = [TokenizedExample(r.id, r.prompt_ids, resp, r.example) for r, resp in zip(rows, out.responses)]
        stats = {**summarise_stats(out.stats), **(extra or {})}
        return SequenceBatch(out.right_padded(tokenizer.pad_token_id), new_rows, stats, out.stats)

    def build(self, rows, *, step, micro, rank, student, teacher, tokenizer) -> SequenceBatch:
        return self.generated(rows, step_seed(self.cfg.seed, step, rank, micro), student, teacher, tokenizer)


class ReplaySequences(GeneratedSequences):
    """DistiLLM's adaptive off-policy scheme over a replay buffer of samples of ``replay_policy`` (``student`` as
    DistiLLM; ``scrg`` for MGSR, whose SCRG-revised student outputs fill the buffer) (``replay.py``).

    Its threshold reacts to the validation loss relative to the loss before training, so it asks the trainer for a
    validation at step 0 (``needs_initial_validation``).
    """

    needs_initial_validation = True

    @classmethod
    def generator_policy(cls, cfg) -> str | None:
        return cfg.replay_policy

    def __init__(self, cfg):
        super().__init__(cfg, policy=cfg.replay_policy)
        self.buffer = ReplayBuffer(cfg.replay_capacity, cfg.replay_init_threshold)

    def build(self, rows, *, step, micro, rank, student, teacher, tokenizer) -> SequenceBatch:
        seed = step_seed(self.cfg.seed, step, rank, micro)
        rng = random.Random(seed)
        action = self.buffer.decide(step, self.cfg.max_steps, rng)
        if action == "gold":
            return self.gold(rows, tokenizer, {"replay/sgo": 0.0})
        if action == "replay":
            items = self.buffer.sample(len(rows), rng)
            new = [TokenizedExample(f"replay-{i}", it["prompt_ids"], it["response_ids"]) for i, it in enumerate(items)]
            return SequenceBatch(collate_for_training(new, tokenizer.pad_token_id), new,
                                 {"replay/sgo": 1.0, "replay/fresh": 0.0})
        out = self.generated(rows, seed, student, teacher, tokenizer, {"replay/sgo": 1.0, "replay/fresh": 1.0})
        self.buffer.push([{"prompt_ids": r.prompt_ids, "response_ids": r.response_ids} for r in out.rows])
        return out

    def state(self) -> dict | None:
        return self.buffer.state()

    def load_state(self, state: dict | None) -> None:
        if state:
            self.buffer = ReplayBuffer.from_state(state)

    def observe_validation(self, metrics: dict) -> None:
        if "val/loss" in metrics:
            self.buffer.observe_val_loss(metrics["val/loss"], self.cfg.replay_threshold_step, self.cfg.replay_loss_eps)
