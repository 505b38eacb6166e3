"""Validation during training: the SFT loss on the validation responses and ROUGE-L of sampled answers.

The answers come from the evaluation's own predictor (``evaluate.predictors.LocalPredictor`` over the model in
memory), so validation samples exactly as ``lmdistill eval`` does: the protocol's sampling (temperature 1, top-k 0,
top-p 1) with each example's noise keyed by (seed, example id), at most ``eval_max_new_tokens`` tokens, on the first
``eval_limit`` validation examples. Checkpoint selection (``best/``) takes the highest ROUGE-L.
"""

from __future__ import annotations

import torch

from lmdistill.data.collate import collate_for_training
from lmdistill.evaluate.predictors import Item, LocalPredictor
from lmdistill.generation import SamplingConfig
from lmdistill.losses import sft_loss
from lmdistill.losses.model_forward import forward_logits, shifted
from lmdistill.rouge import rouge_l_corpus


@torch.no_grad()
def validate(model, tokenizer, rows, *, batch_size: int, max_new_tokens: int, seed: int, template: str) -> dict:
    """``{"val/loss", "val/rougeL"}`` of ``model`` on tokenized validation ``rows`` (empty dict without rows)."""
    if not rows:
        return {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, len(rows), batch_size):
        b = {k: v.to(device) for k, v in collate_for_training(rows[i:i + batch_size], tokenizer.pad_token_id).items()}
        labels, mask = shifted(b)
        n = float(mask.sum())
        total += float(sft_loss(forward_logits(model, b)[:, :-1], labels, mask)) * n
        count += n
    predictor = LocalPredictor.from_model(model, tokenizer, name="validation", template=template)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)   # the protocol's sampling
    preds = []
    for i in range(0, len(rows), batch_size):
        items = [Item(r.example, prompt_ids=r.prompt_ids) for r in rows[i:i + batch_size]]
        preds += [p.outputs[0] for p in predictor.predict(items, seed, sampling)]
    if was_training:
        model.train()
    return {"val/loss": total / max(count, 1.0), "val/rougeL": rouge_l_corpus(preds, [r.example.references for r in rows])}
