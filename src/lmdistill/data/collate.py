"""Batch collation: right padding for training, left padding for generation."""

from __future__ import annotations

import torch

from lmdistill.data.tokenize import TokenizedExample

IGNORE_INDEX = -100


def collate_for_training(batch: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``loss_mask`` and ``labels``.

    ``loss_mask[b, t]`` is 1 where token ``t`` is a response token; the logits at ``t - 1``
    predict it. ``labels`` is ``input_ids`` with ``IGNORE_INDEX`` outside the response.
    """
    width = max(len(x.input_ids) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        n = len(x.input_ids)
        ids[i, :n] = torch.tensor(x.input_ids)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(x.loss_mask)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask, "labels": labels}


def collate_for_generation(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt ``input_ids`` and ``attention_mask``, so every row ends at the same column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": attn}
