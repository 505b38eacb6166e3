"""``GenerationOutput``: the batch a trainer consumes (see docs/CONTRACTS.md, lmdistill.generation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmdistill.data.collate import IGNORE_INDEX
from lmdistill.generation.batch import PADDING, TEACHER, Batch, Decoded


@dataclass
class GenerationOutput:
    """Prompt (left-padded to ``prompt_width``) followed by the response (right-padded).

    - ``input_ids``, ``attention_mask``, ``loss_mask``: ``[B, P + N]``; ``loss_mask`` is 1 on
      response tokens, EOS included (token-aligned, like ``collate_for_training``).
    - ``sources``: ``[B, N]`` per response token: 0 student, 1 teacher (or gold), 2 corrected, -1 padding.
    - ``responses``: per row, the response ids (EOS included when produced).
    - ``stats``: per row, a dict (``length``, ``finished``, ``teacher_fraction``, policy extras).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    prompt_width: int
    responses: list[list[int]]
    sources: torch.Tensor
    stats: list[dict]

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width:]

    def right_padded(self, pad_id: int) -> dict[str, torch.Tensor]:
        """The training view: each row's prompt and response moved to the left edge, padding on the right.

        The same ``input_ids`` / ``attention_mask`` / ``loss_mask`` / ``labels`` layout as
        ``data.collate.collate_for_training`` on the same rows (pinned by a test), built by one gather:
        a row's prompt and response are contiguous in the left-padded layout, so row ``b`` starts at
        column ``P - prompt_len[b]``.
        """
        prompt_len = self.attention_mask[:, :self.prompt_width].sum(1)
        total = self.attention_mask.sum(1)
        width = int(total.max())
        pos = torch.arange(width, device=self.input_ids.device)[None, :]
        inside = pos < total[:, None]
        col = (pos + (self.prompt_width - prompt_len)[:, None]).clamp(max=self.input_ids.shape[1] - 1)
        ids = torch.where(inside, self.input_ids.gather(1, col), torch.full_like(pos, pad_id))
        mask = torch.where(inside, self.loss_mask.gather(1, col), torch.zeros_like(pos))
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
        return {"input_ids": ids, "attention_mask": inside.long(), "loss_mask": mask, "labels": labels}


def assemble(batch: Batch, decoded: Decoded, policy: str) -> GenerationOutput:
    lengths = decoded.lengths.to(batch.device)
    width = max(int(lengths.max()), 1)
    tokens = decoded.tokens[:, :width].to(batch.device)
    sources = decoded.sources[:, :width].to(batch.device)
    resp_mask = (torch.arange(width, device=batch.device)[None, :] < lengths[:, None]).long()
    tokens = torch.where(resp_mask.bool(), tokens, torch.full_like(tokens, batch.pad_id))
    sources = torch.where(resp_mask.bool(), sources, torch.full_like(sources, PADDING))
    prompt_ids, prompt_mask = batch.prompt_ids.to(batch.device), batch.prompt_mask.to(batch.device)
    lens = lengths.tolist()
    rows = tokens.tolist()
    src_rows = sources.tolist()
    stats = []
    for b, n in enumerate(lens):
        s = {"policy": policy, "length": n,
             "finished": batch.eos_id is not None and n > 0 and rows[b][n - 1] == batch.eos_id,
             "teacher_fraction": (sum(1 for x in src_rows[b][:n] if x == TEACHER) / n) if n else 0.0}
        if decoded.stats:
            s.update(decoded.stats[b])
        stats.append(s)
    return GenerationOutput(
        input_ids=torch.cat([prompt_ids, tokens], 1),
        attention_mask=torch.cat([prompt_mask, resp_mask], 1),
        loss_mask=torch.cat([torch.zeros_like(prompt_mask), resp_mask], 1),
        prompt_width=prompt_ids.shape[1],
        responses=[r[:n] for r, n in zip(rows, lens)],
        sources=sources,
        stats=stats,
    )
