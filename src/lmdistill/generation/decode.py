"""The single-model sampling loop (student, teacher, the suffixes SCRG re-generates), and ``ActiveRows``,
which lets every loop leave out of the forward pass the rows that need no more logits."""

from __future__ import annotations

import torch

from lmdistill.generation.batch import Batch, mark_eos
from lmdistill.generation.noise import NoiseSource
from lmdistill.generation.runner import CachedLM
from lmdistill.generation.sampling import NgramBan, pick


def front_permutation(needed: list[bool], k: int) -> list[int]:
    """A permutation that brings the ``k`` needed rows into slots ``0 .. k-1`` moving as few rows as possible: each
    unneeded row among the first ``k`` slots swaps with a needed row behind them (``perm[i]``: the row slot ``i``
    takes). Only swapped rows are copied in the caches (``FastDecoder.reorder``), where a stable sort would shift
    every row behind the first finished one."""
    perm = list(range(len(needed)))
    holes = [i for i in range(k) if not needed[i]]
    extras = [i for i in range(k, len(needed)) if needed[i]]
    for h, e in zip(holes, extras):
        perm[h], perm[e] = e, h
    return perm


class ActiveRows:
    """Keeps the rows a loop still computes in the first ``k`` slots of the batch.

    After each step the loop says which rows need next-token logits (``update``); when those are not
    the first slots, every per-row tensor it passes, the models' caches (``CachedLM.reorder``) and the
    noise are permuted so they are, and the loop then feeds only ``rows=k`` of them. ``to_caller`` puts
    a tensor back in the caller's row order and ``restore`` the caches. Where a model cannot skip rows
    (the HF backend) or ``enabled`` is false, nothing moves and every row is computed. ``ban``
    (``sampling.NgramBan``, the batch's ``no_repeat_ngram_size``) follows the rows like the noise does.
    """

    def __init__(self, lms: list[CachedLM], noise: NoiseSource, size: int, enabled: bool = True,
                 ban: NgramBan | None = None):
        self.lms, self.noise, self.size, self.ban = lms, noise, size, ban
        self.enabled = enabled and all(lm.can_skip_rows for lm in lms)
        self.k = size
        self.order: torch.Tensor | None = None  # order[i]: the caller's row now in slot i
        self.inverse: torch.Tensor | None = None

    def update(self, needed: torch.Tensor, finished: torch.Tensor, rows: list[torch.Tensor]
               ) -> tuple[bool, list[torch.Tensor]]:
        """``(stop, rows)``: stop when ``finished``; else ``rows`` re-ordered if needed. One host sync."""
        if not self.enabled:
            return bool(finished), rows
        in_front = (needed[1:].long() <= needed[:-1].long()).all()
        flags = torch.cat([torch.stack([finished.long(), needed.sum(), in_front.long()]), needed.long()]).tolist()
        (stop, self.k, in_front), needed_rows = flags[:3], flags[3:]
        if stop or in_front:
            return bool(stop), rows
        order = front_permutation(needed_rows, self.k)
        perm = torch.tensor(order, dtype=torch.long, device=needed.device)
        for lm in self.lms:
            lm.reorder(perm)
        self.noise = self.noise.select(order)
        if self.ban is not None:
            self.ban = self.ban.select(perm)
        self.order = perm if self.order is None else self.order[perm]
        self.inverse = torch.argsort(self.order)
        return False, [x[perm] for x in rows]

    def step(self, lm: CachedLM, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Feed the computed rows' ``tokens``; return ``logits`` with those rows' next-token logits
        (the other rows keep stale ones, which nothing reads)."""
        if not self.enabled:
            return lm.step(tokens)
        fresh = lm.step(tokens, rows=self.k)
        if self.k == self.size:
            return fresh
        if self.k:
            logits[:self.k] = fresh
        return logits

    def banned(self, tokens: torch.Tensor, t: int) -> torch.Tensor | None:
        """The ``[k, V]`` ids the computed rows may not draw at response position ``t`` (their context: prompt
        + ``tokens[:, :t]``), or ``None`` without an n-gram ban."""
        return None if self.ban is None else self.ban.mask(tokens[:self.k, :t])

    def to_caller(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.order is None else x[self.inverse]

    def restore(self) -> None:
        if self.order is not None:
            for lm in self.lms:
                lm.reorder(self.inverse)


def no_eos(batch: Batch) -> torch.Tensor:
    return torch.zeros((), dtype=torch.bool, device=batch.device)


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
    forward pass (``ActiveRows``). Tokens are the same either way: each row's noise and logits are its
    own. Not done while re-generating under ``observe`` (the scorer needs every row's logits there).

    ``config.no_repeat_ngram_size = n > 0``: a sampled position draws from its logits with every id that would
    repeat an n-gram of the row's prompt (left padding excluded) + ``tokens[:, :t]`` set to -inf
    (``sampling.NgramBan``, transformers' ``NoRepeatNGramLogitsProcessor``); forced positions keep their token.
    ``observe`` still gets the unbanned logits (the model's own distribution).
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
    rows = ActiveRows([lm], batch.noise, b, enabled=not (observe is not None and tokens is not None),
                      ban=NgramBan.of(batch))
    for t in range(start, n):
        k = rows.k
        nxt = out[:, t].clone()
        if k:
            nxt[:k] = pick(logits[:k, :vocab], cfg, None if cfg.greedy else rows.noise.gumbel(t, stream, rows=k),
                           banned=rows.banned(out, t))
        if tokens is not None:  # frozen rows and forced positions keep their token
            nxt = torch.where(~live | (t < free_from), out[:, t], nxt)
        nxt = torch.where(done, pad, nxt)
        out[:, t] = nxt
        done, lengths = mark_eos(nxt, t, done, lengths, batch.eos_id, live)
        if observe is not None:
            observe(t, rows.to_caller(logits[:, :vocab]), rows.to_caller(out))
        if t == n - 1:
            break
        needed = live & ~done
        if forced_cached:
            needed &= free_from <= t + 1
        finished = (done | ~live).all() if batch.eos_id is not None else no_eos(batch)
        stop, (out, free_from, live, lengths, done, logits) = rows.update(
            needed, finished, [out, free_from, live, lengths, done, logits])
        if stop:
            break
        logits = rows.step(lm, out[:, t], logits)
    out, lengths = rows.to_caller(out), rows.to_caller(lengths)
    rows.restore()
    return out, lengths
