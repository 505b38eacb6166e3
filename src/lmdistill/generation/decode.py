"""The single-model sampling loop (student, teacher, the suffixes SCRG re-generates)."""

from __future__ import annotations

import torch

from lmdistill.generation.batch import Batch, mark_eos
from lmdistill.generation.runner import CachedLM
from lmdistill.generation.sampling import pick


def sample_loop(lm: CachedLM, logits: torch.Tensor, batch: Batch, *, stream: int = 0, start: int = 0,
                tokens: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                free_from: torch.Tensor | None = None, forced_cached: bool = False,
                observe=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill response positions ``start .. N-1`` of every row; return ``(tokens [B, N], lengths [B])``.

    ``logits`` ``[B, V]`` predicts position ``start`` (``lm`` holds ``start`` response tokens).
    Row b samples from position ``free_from[b]`` on; before that it re-feeds ``tokens[b, t]``
    (forced). A row whose ``free_from`` is ``N`` is left as it is (``lengths[b]`` kept). A row stops
    at EOS: its later positions are ``pad_id``. ``observe(t, logits, tokens)``, if given, is called once
    position ``t`` is filled, with the ``[B, V]`` logits it was drawn from (SCRG scores them as it goes).

    Rows that need no next-token logits (finished, frozen, or, with ``forced_cached``, forced over
    tokens the cache already holds from an earlier pass: SCRG's kept prefixes) are left out of the
    forward pass where the backend allows it (``lm.can_skip_rows``):
    the batch is kept ordered so that the rows still computed come first (``lm.reorder``), and the
    result is put back in the caller's order. Tokens are the same either way: each row's noise and
    logits are its own. Not done while re-generating under ``observe`` (the scorer needs every row's
    logits there).
    """
    n, cfg, vocab = batch.max_new_tokens, batch.config, batch.vocab
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
    packing = lm.can_skip_rows and not (observe is not None and tokens is not None)
    noise, order, inverse = batch.noise, None, None  # order[i]: the caller's row now in slot i
    k = b  # slots [:k] hold fresh logits
    for t in range(start, n):
        nxt = out[:, t].clone()
        if k:
            nxt[:k] = pick(logits[:k, :vocab], cfg, None if cfg.greedy else noise.gumbel(t, stream, rows=k))
        if tokens is not None:  # frozen rows and forced positions keep their token
            nxt = torch.where(~live | (t < free_from), out[:, t], nxt)
        nxt = torch.where(done, pad, nxt)
        out[:, t] = nxt
        done, lengths = mark_eos(nxt, t, done, lengths, batch.eos_id, live)
        if observe is not None:
            observe(t, logits[:, :vocab] if order is None else logits[inverse, :vocab],
                    out if order is None else out[inverse])
        if t == n - 1 or (batch.eos_id is not None and bool((done | ~live).all())):  # the one sync per step
            break
        if not packing:
            logits = lm.step(nxt)
            continue
        needed = live & ~done
        if forced_cached:
            needed &= free_from <= t + 1
        k = int(needed.sum())
        if not bool(needed[:k].all()):  # move the rows still computed to the front
            perm = torch.argsort((~needed).to(torch.int8), stable=True)
            out, free_from, live, lengths, done, logits = (x[perm] for x in (out, free_from, live, lengths, done,
                                                                             logits))
            lm.reorder(perm)
            noise = noise.select(perm.tolist())
            order = perm if order is None else order[perm]
            inverse = torch.argsort(order)
        fresh = lm.step(out[:, t], rows=k)
        if k == b:
            logits = fresh
        elif k:  # the rows left out keep stale logits, which nothing reads
            logits[:k] = fresh
    if order is not None:  # back to the caller's order
        out, lengths = out[inverse], lengths[inverse]
        lm.reorder(inverse)
    return out, lengths
