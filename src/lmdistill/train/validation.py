"""Validation during training: the SFT loss on the validation responses and ROUGE-L of sampled answers.

The answers come from the evaluation's own predictor (``evaluate.predictors.LocalPredictor`` over the model in
memory), so validation samples as ``lmdistill eval`` does: the protocol's sampling (temperature 1, top-k 0,
top-p 1, ``no_repeat_ngram_size`` 6: the MiniLLM/DistiLLM evaluation's ``--no-repeat-ngram-size`` default, LMOps
``minillm/arguments.py:180``, distillm ``arguments.py:203``) with each example's noise keyed by (seed, example id),
at most ``eval_max_new_tokens`` tokens (the caller's ``max_new_tokens``; the protocol's evaluation allows 256), on
the first ``eval_limit`` validation examples (the rows the caller passes). Checkpoint selection (``best/``) takes the
highest ROUGE-L, so it ranks checkpoints under the decoding the final evaluation uses.

Note: MiniLLM's own in-training validation (``minillm/finetune.py:384-395``) builds its ``GenerationConfig``
without ``no_repeat_ngram_size`` (so no ban) and generates ``max_length - prompt width`` tokens
(``finetune.py:425``); we follow the evaluation protocol instead, as the selected checkpoint is then scored by it.
The validation prompts are the rows the caller tokenized (``train.setup.load_rows``: prompts over
``max_prompt_length`` are dropped there, as MiniLLM's processed validation data drops them,
``tools/process_data_dolly.py:57-58``); no truncation happens here.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lmdistill.data.collate import collate_for_training
from lmdistill.evaluate.predictors import Item, LocalPredictor
from lmdistill.evaluate.run import EvalSettings
from lmdistill.generation import SamplingConfig
from lmdistill.losses import sft_loss
from lmdistill.losses.model_forward import forward_logits, shifted
from lmdistill.rouge import rouge_l_corpus

#: the evaluation protocol's n-gram ban (``EvalSettings.no_repeat_ngram_size``)
PROTOCOL_NO_REPEAT_NGRAM = EvalSettings.no_repeat_ngram_size


def validation_sampling(max_new_tokens: int, no_repeat_ngram_size: int = PROTOCOL_NO_REPEAT_NGRAM) -> SamplingConfig:
    """The sampling of validation: the protocol's (``EvalSettings``' temperature, top-k, top-p and n-gram ban),
    with ``max_new_tokens`` new tokens at most (the seed is set per call by the predictor)."""
    proto = EvalSettings(max_new_tokens=max_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size)
    return proto.sampling()


@torch.no_grad()
def validate(model, tokenizer, rows, *, batch_size: int, max_new_tokens: int, seed: int, template: str,
             no_repeat_ngram_size: int = PROTOCOL_NO_REPEAT_NGRAM, progress: bool = False) -> dict:
    """``{"val/loss", "val/rougeL"}`` of ``model`` on tokenized validation ``rows`` (empty dict without rows);
    ``progress`` shows a bar over the answers (the slow part: up to ``max_new_tokens`` tokens each)."""
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
    sampling = validation_sampling(max_new_tokens, no_repeat_ngram_size)
    preds = []
    with tqdm(total=len(rows), desc=f"validation ({max_new_tokens} new tokens at most)", unit="answer",
              disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for i in range(0, len(rows), batch_size):
            items = [Item(r.example, prompt_ids=r.prompt_ids) for r in rows[i:i + batch_size]]
            preds += [p.outputs[0] for p in predictor.predict(items, seed, sampling)]
            bar.update(len(items))
    if was_training:
        model.train()
    return {"val/loss": total / max(count, 1.0), "val/rougeL": rouge_l_corpus(preds, [r.example.references for r in rows])}
