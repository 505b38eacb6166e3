"""DistiLLM's adaptive off-policy scheme: a replay buffer of student-generated outputs (SGO).

Reconstruction of DistiLLM (Ko et al., 2024), configurable through the recipe:
- each step uses SGO with probability ``threshold`` (starts at ``replay_init_threshold``; raised by
  ``replay_threshold_step`` whenever the validation loss rises by at least ``replay_loss_eps``), else gold data;
- when SGO is used, fresh sequences are generated with probability ``1 - step / max_steps`` (linear decay) and
  pushed to the buffer (FIFO, ``replay_capacity`` sequences); otherwise a batch is drawn from the buffer.
The buffer and the threshold are saved in checkpoints.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class ReplayBuffer:
    capacity: int
    threshold: float
    items: list[dict] = field(default_factory=list)   # {"prompt_ids", "response_ids"}
    last_val_loss: float | None = None

    def push(self, rows: list[dict]) -> None:
        self.items.extend(rows)
        if len(self.items) > self.capacity:
            del self.items[: len(self.items) - self.capacity]

    def sample(self, n: int, rng: random.Random) -> list[dict]:
        return [self.items[rng.randrange(len(self.items))] for _ in range(n)]

    def decide(self, step: int, max_steps: int, n: int, rng: random.Random) -> str:
        """'gold', 'generate' or 'replay' for this step."""
        if rng.random() >= self.threshold:
            return "gold"
        gen_prob = 1.0 - step / max(max_steps, 1)
        if len(self.items) < n or rng.random() < gen_prob:
            return "generate"
        return "replay"

    def observe_val_loss(self, loss: float, step_up: float, eps: float) -> None:
        if self.last_val_loss is not None and loss - self.last_val_loss >= eps:
            self.threshold = min(1.0, self.threshold + step_up)
        self.last_val_loss = loss

    def state(self) -> dict:
        return {"capacity": self.capacity, "threshold": self.threshold, "items": self.items,
                "last_val_loss": self.last_val_loss}

    @classmethod
    def from_state(cls, s: dict) -> "ReplayBuffer":
        return cls(s["capacity"], s["threshold"], s["items"], s["last_val_loss"])
