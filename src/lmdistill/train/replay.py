"""DistiLLM's adaptive off-policy scheme: a replay buffer of student-generated outputs (SGO).

Transcribes jongwooko/distillm ``finetune.py`` (``finetune``, lines 265-323 and 411-417; the buffer is
``distillm/buffer.py``). For each micro-batch draw ``r ~ U(0, 1)``; with the adaptive threshold ``a`` and
``s = a * (1 - (step + 1) / max_steps)`` (the reference's ``global_step`` counts from 1; ``--replay-ratio
decreasing``, its default):

- ``r < s``, or ``r < a`` while the buffer holds fewer than ``capacity`` sequences: sample fresh student
  sequences, push them to the buffer and train on them;
- else ``r < a``: train on ``n`` sequences drawn from the buffer without replacement (``random.sample``);
- else: train on the gold batch.

``a`` starts at ``init_threshold`` (the reference script passes 0.0: the run starts as pure KD on gold data). The
reference validation loss is measured before the first step (``finetune.py:266``); at each later validation, if
the loss is at least ``loss_eps`` above the reference, ``a`` rises by ``threshold_step`` (capped at 1) and the
reference becomes that loss; otherwise neither changes (``finetune.py:413-417``). The buffer is a FIFO of
``capacity`` sequences (``deque(maxlen=capacity)``). Buffer, threshold and reference loss are saved in checkpoints.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class ReplayBuffer:
    capacity: int
    threshold: float
    items: list[dict] = field(default_factory=list)   # {"prompt_ids", "response_ids"}
    reference_loss: float | None = None

    def push(self, rows: list[dict]) -> None:
        self.items.extend(rows)
        if len(self.items) > self.capacity:
            del self.items[: len(self.items) - self.capacity]

    def sample(self, n: int, rng: random.Random) -> list[dict]:
        """``n`` distinct buffered sequences (``random.sample``, as ``ReplayBuffer.sample`` does)."""
        return rng.sample(self.items, n)

    def decide(self, step: int, max_steps: int, rng: random.Random) -> str:
        """``'generate'``, ``'replay'`` or ``'gold'`` for this micro-batch (step counted from 0)."""
        r = rng.random()
        fresh = self.threshold * (1.0 - (step + 1) / max(max_steps, 1))
        if r < fresh or (r < self.threshold and len(self.items) < self.capacity):
            return "generate"
        if r < self.threshold:
            return "replay"
        return "gold"

    def observe_val_loss(self, loss: float, step_up: float, eps: float) -> None:
        """The first loss is the reference; a later one ``>= reference + eps`` raises the threshold and the reference."""
        if self.reference_loss is None:
            self.reference_loss = loss
        elif loss >= self.reference_loss + eps:
            self.threshold = min(1.0, self.threshold + step_up)
            self.reference_loss = loss

    def state(self) -> dict:
        return {"capacity": self.capacity, "threshold": self.threshold, "items": self.items,
                "reference_loss": self.reference_loss}

    @classmethod
    def from_state(cls, s: dict) -> "ReplayBuffer":
        return cls(s["capacity"], s["threshold"], s["items"], s.get("reference_loss", s.get("last_val_loss")))
