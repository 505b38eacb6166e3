"""What every policy receives: the left-padded prompts, the settings, the noise, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmdistill.generation.config import SamplingConfig
from lmdistill.generation.noise import NoiseSource
from lmdistill.generation.runner import CachedLM

STUDENT, TEACHER, CORRECTED, PADDING = 0, 1, 2, -1


@dataclass
class Batch:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    config: SamplingConfig
    pad_id: int
    eos_id: int | None
    vocab: int  # tokens are drawn among ids < vocab
    noise: NoiseSource
    device: torch.device
    gold: list[list[int] | None] | None = None
    params: object = None     # the policy's parameters (its Params dataclass)
    scorer: object = None     # a teacher that scores whole sequences (SCRG without a teacher model)

    @property
    def size(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens

    def runner(self, model) -> CachedLM:
        return CachedLM(model, self.prompt_ids, self.prompt_mask, self.max_new_tokens, backend=self.config.decoder)

    def subset(self, rows: list[int]) -> "Batch":
        """The same batch restricted to ``rows`` (re-padded to their own width); noise keys follow the rows."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.prompt_ids.device)
        mask = self.prompt_mask[idx]
        width = int(mask.sum(1).max())
        gold = [self.gold[r] for r in rows] if self.gold is not None else None
        return Batch(self.prompt_ids[idx][:, -width:], mask[:, -width:], self.config, self.pad_id, self.eos_id,
                     self.vocab, self.noise.select(rows), self.device, gold, self.params, self.scorer)


@dataclass
class Decoded:
    """A policy's result: response tokens (pad after the end), lengths (EOS included), sources, stats."""

    tokens: torch.Tensor  # [B, N]
    lengths: torch.Tensor  # [B]
    sources: torch.Tensor  # [B, N] STUDENT / TEACHER / CORRECTED, PADDING after the end
    stats: list[dict] = field(default_factory=list)


def source_tags(lengths: torch.Tensor, width: int, tag: int) -> torch.Tensor:
    """``tag`` on the first ``lengths[b]`` positions of each row, PADDING after."""
    pos = torch.arange(width, device=lengths.device)[None, :]
    return torch.where(pos < lengths[:, None], torch.full_like(pos, tag), torch.full_like(pos, PADDING))


def mark_eos(nxt: torch.Tensor, t: int, done: torch.Tensor, lengths: torch.Tensor, eos_id: int | None,
             live: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (among ``live``) that emitted EOS at step ``t`` end there: length ``t + 1``, marked done."""
    if eos_id is None:
        return done, lengths
    ended = ~done & (nxt == eos_id)
    if live is not None:
        ended = ended & live
    return done | ended, torch.where(ended, torch.full_like(lengths, t + 1), lengths)
