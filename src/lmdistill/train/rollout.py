"""``rollout``: MiniLLM's PPO schedule, several epochs over a stored rollout (microsoft/LMOps ``minillm/``).

The reference samples ``num_rollouts`` sequences with the teacher-mixed policy, stores each with its behaviour
log-probs (``minillm/sampler.py:39-165``, ``storages.py:61-175``), then runs ``ppo_epochs`` passes over the store,
one optimiser step per minibatch, reshuffled each pass (``trainer.py:242-381``: ``for ppo_epoch in
range(n_updates_per_batch): for batch in train_dataloader``), and samples the next rollout when the passes are
done (``post_epoch_callback``, ``trainer.py:386-391``).

The schedule is this policy's: ``policy: {name: rollout, ppo_epochs: 4, num_rollouts: null, alpha: 0.2,
temperature: 1.0}``. Here a rollout is ``k = num_rollouts / batch_size`` optimiser steps of sequences (null = one
step's batch, k = 1), and a round is ``k * ppo_epochs`` steps:

- pass 0 (steps 0..k-1 of the round): sample the step's rows with ``teacher_mix`` (mixture share ``alpha``; the
  tokens drawn as the recipe's ``sampling:`` says),
  compute the sampling student's log-probs log q_old(y_t) (no gradient), store both, train on them;
- passes 1..ppo_epochs-1: serve the stored sequences of this process, in an order reshuffled per pass (seeded by
  the round's first step, the pass and the rank), one step's share at a time, micro-batch by micro-batch.

The rows the trainer hands over during passes 1.. are not used (their prompts are skipped, as the reference's
prompt loader only advances when it samples). With k = 1 (the reference's GPT-2 base run: 256 rollouts = 16 GPUs
x batch 16) every sequence of a rollout is drawn by the same student, as in the reference; with k > 1 pass 0
samples each step's share with the student of that step (its own behaviour policy, stored with it), where the
reference samples all k shares before the round's first update.

The behaviour log-probs travel in the batch as ``old_logprobs`` (token-aligned like ``loss_mask``, 0 elsewhere, at
``temperature``: ``pg_rkl`` must use the same, which the config check confirms), which ``pg_rkl`` reads, with the
mixture's ``alpha`` as the batch field ``mix_alpha``; the teacher's log-probs are recomputed by the loss (the
teacher is frozen). The store is saved in checkpoints (every process's, gathered) and restored exactly (floats
round-trip through JSON).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmdistill.data.collate import collate_for_training
from lmdistill.data.tokenize import TokenizedExample
from lmdistill.errors import ConfigError
from lmdistill.generation import POLICIES as ENGINE_POLICIES
from lmdistill.generation.policies.teacher_mix import TeacherMixParams
from lmdistill.losses.model_forward import forward_logits, shifted
from lmdistill.losses.policy_gradient import token_logprobs
from lmdistill.runtime import rank_world
from lmdistill.train.data_order import step_seed
from lmdistill.train.sequences import GeneratedSequences, SequenceBatch

@dataclass(frozen=True)
class RolloutParams:
    """MiniLLM's PPO schedule: ``ppo_epochs`` passes over each rollout of ``num_rollouts`` sequences (null: one step's
    batch), sampled with teacher-mixed share ``alpha``; behaviour log-probs at ``temperature`` (the term's)."""

    ppo_epochs: int = 4
    num_rollouts: int | None = None
    alpha: float = 0.2
    temperature: float = 1.0

    def __post_init__(self):
        if isinstance(self.ppo_epochs, bool) or not isinstance(self.ppo_epochs, int) or self.ppo_epochs < 1:
            raise ConfigError(f"ppo_epochs: must be an integer >= 1, got {self.ppo_epochs!r}")
        if self.num_rollouts is not None and (isinstance(self.num_rollouts, bool)
                                              or not isinstance(self.num_rollouts, int) or self.num_rollouts < 1):
            raise ConfigError(f"num_rollouts: must be a positive integer or null (one step's batch), "
                              f"got {self.num_rollouts!r}")
        TeacherMixParams(self.alpha)   # the mixture's range check
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"temperature: must be > 0, got {self.temperature!r}")


class RolloutSequences(GeneratedSequences):
    """``rollout``: stored ``teacher_mix`` rollouts served for ``ppo_epochs`` passes (module docstring)."""

    name = "rollout"
    Params = RolloutParams
    engine = ENGINE_POLICIES["teacher_mix"]

    @classmethod
    def teacher_needs(cls, params) -> tuple[str, ...]:
        return cls.engine.teacher_needs(TeacherMixParams(params.alpha))

    @classmethod
    def provides(cls, params) -> dict[str, dict]:
        return {"old_logprobs": {"temperature": float(params.temperature)}, "mix_alpha": {}}

    def fields(self) -> dict:
        return {"mix_alpha": self.params.alpha}

    def __init__(self, cfg, params=None):
        super().__init__(cfg, params)
        self.mix = TeacherMixParams(self.params.alpha)
        self.ppo_epochs, self.temperature = self.params.ppo_epochs, float(self.params.temperature)
        n = self.params.num_rollouts or cfg.batch_size
        if n % cfg.batch_size:
            raise ConfigError(f"policy.num_rollouts: ({n}) must be a multiple of batch_size "
                              f"({cfg.batch_size}): a rollout is a whole number of optimiser steps")
        self.k = n // cfg.batch_size
        self.round: int | None = None
        self.items: dict[str, list[dict]] = {}   # "share:micro" -> stored sequences of this process

    # ------------------------------------------------------------------ schedule
    @property
    def round_steps(self) -> int:
        return self.k * self.ppo_epochs

    def position(self, step: int) -> tuple[int, int, int]:
        """(round, pass, share) of optimiser step ``step``."""
        rnd, phase = divmod(step, self.round_steps)
        return rnd, phase // self.k, phase % self.k

    # ------------------------------------------------------------------ build
    def build(self, rows, *, step, micro, rank, student, teacher, tokenizer) -> SequenceBatch:
        rnd, ppo_pass, share = self.position(step)
        if rnd != self.round:
            self.round, self.items = rnd, {}
        if ppo_pass == 0 or not self.items:   # a round restored without its store samples afresh
            return self.sample(rows, step, micro, rank, share, student, teacher, tokenizer)
        return self.serve(rows, rnd, ppo_pass, share, micro, rank, tokenizer)

    def sample(self, rows, step, micro, rank, share, student, teacher, tokenizer) -> SequenceBatch:
        out = self.generated(rows, step_seed(self.cfg.seed, step, rank, micro), student, teacher, tokenizer,
                             {"rollout/fresh": 1.0, "rollout/ppo_epoch": 0.0}, params=self.mix)
        old = self.behaviour_logprobs(student, teacher, out.batch)
        out.batch["old_logprobs"] = old
        old_rows = old.detach().cpu().tolist()
        prompt_lens = [len(r.prompt_ids) for r in out.rows]
        self.items[f"{share}:{micro}"] = [
            {"id": r.id, "prompt_ids": list(r.prompt_ids), "response_ids": list(r.response_ids),
             "old_logprobs": old_rows[i][p:p + len(r.response_ids)]}
            for i, (r, p) in enumerate(zip(out.rows, prompt_lens))]
        return out

    @torch.no_grad()
    def behaviour_logprobs(self, student, teacher, batch: dict) -> torch.Tensor:
        """``log q_old(y_t)`` token-aligned with ``input_ids`` (0 where ``loss_mask`` is 0), as ``pg_rkl`` computes
        ``log q`` (same vocabulary prefix and temperature), in eval mode (no dropout: the reference keeps its
        student in eval mode throughout, ``minillm/model.py:14``)."""
        was_training = student.training
        student.eval()
        try:
            logits = forward_logits(student, batch)[:, :-1]
        finally:
            student.train(was_training)
        v = min(x for x in (logits.shape[-1], teacher.vocab) if x)
        targets, mask = shifted(batch)
        lp = token_logprobs(logits, targets, v, self.temperature) * mask
        return torch.cat([torch.zeros_like(lp[:, :1]), lp], 1)

    def serve(self, rows, rnd, ppo_pass, share, micro, rank, tokenizer) -> SequenceBatch:
        stored = [it for key in sorted(self.items, key=lambda s: tuple(map(int, s.split(":"))))
                  for it in self.items[key]]
        order = list(range(len(stored)))
        random.Random(step_seed(self.cfg.seed, rnd * self.round_steps, rank, ppo_pass)).shuffle(order)
        per_step = len(stored) // self.k
        start = share * per_step + micro * self.cfg.micro_batch_size
        picked = [stored[i] for i in order[start:start + len(rows)]]
        new = [TokenizedExample(it["id"], it["prompt_ids"], it["response_ids"]) for it in picked]
        batch = collate_for_training(new, tokenizer.pad_token_id)
        old = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        for i, it in enumerate(picked):
            p = len(it["prompt_ids"])
            old[i, p:p + len(it["old_logprobs"])] = torch.tensor(it["old_logprobs"], dtype=torch.float32)
        batch["old_logprobs"] = old
        return SequenceBatch(batch, new, {"rollout/fresh": 0.0, "rollout/ppo_epoch": float(ppo_pass)},
                             fields=self.fields())

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> dict:
        """The store of every process (gathered: the trainer writes rank 0's state only)."""
        mine = {"round": self.round, "items": self.items}
        rank, world = rank_world()
        if world > 1:
            every: list = [None] * world
            dist.all_gather_object(every, mine)
            return {"ranks": every}
        return {"ranks": [mine]}

    def load_state(self, state: dict | None) -> None:
        if not state:
            return
        rank, _ = rank_world()
        ranks = state.get("ranks", [])
        mine = ranks[rank] if rank < len(ranks) else {"round": None, "items": {}}
        self.round, self.items = mine["round"], {k: list(v) for k, v in mine["items"].items()}
