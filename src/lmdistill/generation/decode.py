"""The single-model sampling loop (student, teacher, the suffixes SCRG re-generates)."""

from __future__ import annotations

import torch

from lmdistill.generation.batch import Batch, mark_eos
from lmdistill.generation.runner import CachedLM
from lmdistill.generation.sampling import pick


def sample_loop(lm: CachedLM, logits: torch.Tensor, batch: Batch, *, stream: int = 0, start: int = 0,
                tokens: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                free_from: torch.Tensor | None = None, record: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill response positions ``start .. N-1`` of every row; return ``(tokens [B, N], lengths [B])``.

    ``logits`` ``[B, V]`` predicts position ``start`` (``lm`` holds ``start`` response tokens).
    Row b samples from position ``free_from[b]`` on; before that it re-feeds ``tokens[b, t]``
    (forced). A row whose ``free_from`` is ``N`` is left as it is (``lengths[b]`` kept). A row stops
    at EOS: its later positions are ``pad_id``. ``record`` ``[B, N, V]``, if given, receives the
    logits of every position visited (for scoring without another forward pass).
    """
    n, cfg = batch.max_new_tokens, batch.config
    dev = lm.device
    b = logits.shape[0]
    if tokens is None:
        out = torch.full((b, n), batch.pad_id, dtype=torch.long, device=dev)
    else:
        out = tokens.clone().to(dev)
    free_from = free_from.to(dev) if free_from is not None else torch.zeros(b, dtype=torch.long, device=dev)
    live = free_from < n
    lengths = lengths.clone().to(dev) if lengths is not None else torch.full((b,), n, dtype=torch.long, device=dev)
    lengths = torch.where(live, torch.full_like(lengths, n), lengths)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    pad = torch.full((b,), batch.pad_id, dtype=torch.long, device=dev)
    for t in range(start, n):
        logits = logits[:, :batch.vocab]
        if record is not None:
            record[:, t] = logits
        nxt = pick(logits, cfg, None if cfg.greedy else batch.noise.gumbel(t, stream))
        if tokens is not None:  # frozen rows and forced positions keep their token
            nxt = torch.where(~live | (t < free_from), out[:, t], nxt)
        nxt = torch.where(done, pad, nxt)
        out[:, t] = nxt
        done, lengths = mark_eos(nxt, t, done, lengths, batch.eos_id, live)
        if t == n - 1 or (batch.eos_id is not None and bool((done | ~live).all())):  # the one sync per step
            break
        logits = lm.step(nxt)
    return out, lengths
