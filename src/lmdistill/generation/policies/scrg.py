"""``scrg``: MGSR's sequence correction and re-generation (arXiv 2407.10068, docs/METHODS.md).

1. The student samples a response y; as it goes, the teacher scores it (see "Streaming" below):
   d_t = KL(p_t || q_t) (``per_token_divergence("fkl", ...)`` at the sampling temperature, 1 when
   greedy) and the teacher's argmax at every response position t.
2. Candidates: positions t < length where y_t differs from the teacher's argmax. The error position
   j is the candidate with the largest d_t (the first one on ties).
3. y_j becomes the teacher's argmax (tag 2, corrected); the student re-generates from j + 1 on.
   Rows correct at different positions, so the student cache is cropped to the earliest j of the
   batch and each row re-feeds its own kept tokens up to its j before sampling again (only the
   suffix after min j is new work; one batched step per position).
4. ``scrg_rounds`` rounds; a round that has another after it re-scores the positions from the
   earliest correction on while it re-generates. A row without candidates is kept unchanged (our
   choice; the paper is silent).

Streaming: the student's step logits q_t are buffered for ``SCORE_CHUNK`` positions; then one teacher
forward over those tokens (extending the teacher's cache) gives their p_t, and only d_t and the teacher's
argmax are kept. Memory is ``O(B * SCORE_CHUNK * V)`` rather than ``O(B * N * V)`` for q and p (at a
152k vocabulary, batch 8, 256 tokens: 0.3 GB instead of 2.5 GB), for the same teacher compute as one
forward over the whole response.

``stats["correction_positions"]``: j per round that corrected; ``stats["regenerated_tokens"]``:
tokens sampled anew after corrections.

``no_repeat_ngram_size = n > 0``: the ban applies to what each model writes. The student samples with the
row's banned ids at -inf (``decode.sample_loop``), and the teacher's "argmax" at position t is the argmax of
its logits with the ids banned by prompt + y_<t set to -inf, so a correction never introduces a repeated
n-gram (and a position whose student token is the teacher's best allowed token is not a candidate). d_t is
KL of the unbanned distributions (the models' disagreement, as SWITCH's JSD; see ``switch.py``).
"""

from __future__ import annotations

import torch

from lmdistill.generation.batch import CORRECTED, PADDING, STUDENT, Batch, Decoded, source_tags
from lmdistill.generation.decode import sample_loop
from lmdistill.generation.runner import CachedLM
from lmdistill.generation.sampling import NgramBan
from lmdistill.losses import per_token_divergence

SCORE_CHUNK = 32


class StreamingScorer:
    """Per-position KL(p_t || q_t) and teacher argmax (among the ids the n-gram ban allows) for tokens as the
    student writes them.

    ``restart(tokens, t)`` makes position ``t`` the next one to score (the teacher's cache is cropped to
    hold ``tokens[:, :t]``); then ``observe`` (the ``sample_loop`` hook) buffers each step's student
    logits and scores a full buffer in one teacher forward; ``flush`` scores what is left.
    """

    def __init__(self, teacher: CachedLM, batch: Batch, chunk: int = SCORE_CHUNK):
        n = batch.max_new_tokens
        self.teacher, self.vocab, self.chunk = teacher, batch.vocab, chunk
        self.temperature = batch.config.divergence_temperature
        self.kl = torch.zeros((batch.size, n), dtype=torch.float32, device=batch.device)
        self.top = torch.zeros((batch.size, n), dtype=torch.long, device=batch.device)
        self.q: torch.Tensor | None = None  # [B, chunk, V] student logits of positions start .. start + filled - 1
        self.start = self.filled = 0
        self.pending: torch.Tensor | None = None  # teacher logits predicting position ``start``
        self.ban = NgramBan.of(batch)  # rows in the caller's order, as the tokens the scorer sees

    def restart(self, tokens: torch.Tensor, t: int) -> None:
        self.pending = self.teacher.logits_at(tokens, t)[:, :self.vocab]
        self.start, self.filled = t, 0

    def observe(self, t: int, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        if self.q is None:
            self.q = logits.new_empty((logits.shape[0], self.chunk, logits.shape[1]))
        self.q[:, self.filled] = logits
        self.filled += 1
        if self.filled == self.chunk:
            self.flush(tokens)

    def flush(self, tokens: torch.Tensor) -> None:
        a, k = self.start, self.filled
        if k == 0:
            return
        fed = tokens[:, a:a + k].to(self.teacher.device)
        ahead = self.teacher.extend(fed)[:, :, :self.vocab].to(self.kl.device)  # predicts a+1 .. a+k
        p = torch.cat([self.pending[:, None].to(ahead.device), ahead[:, :-1]], 1)
        self.kl[:, a:a + k] = per_token_divergence("fkl", self.q[:, :k], p, temperature=self.temperature)
        if self.ban is None:
            self.top[:, a:a + k] = p.argmax(-1)
        else:  # position a + i: banned by prompt + tokens[:, :a + i]
            for i in range(k):
                banned = self.ban.mask(tokens[:, :a + i]).to(p.device)
                self.top[:, a + i] = p[:, i].masked_fill(banned, float("-inf")).argmax(-1)
        self.pending, self.start, self.filled = ahead[:, -1], a + k, 0


def error_positions(tokens: torch.Tensor, lengths: torch.Tensor, kl: torch.Tensor,
                    teacher_top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(j [B], has_candidate [B])``: the argmax of ``kl`` over positions (within each row's length)
    whose token differs from ``teacher_top``. ``j`` is -1 where no position qualifies."""
    valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
    candidate = valid & (tokens != teacher_top)
    j = torch.where(candidate, kl, torch.full_like(kl, float("-inf"))).argmax(-1)
    has = candidate.any(-1)
    return torch.where(has, j, torch.full_like(j, -1)), has


def run(student, teacher, batch: Batch) -> Decoded:
    cfg, n, dev = batch.config, batch.max_new_tokens, batch.device
    s_lm = batch.runner(student)
    scorer = None
    if cfg.scrg_rounds > 0:
        scorer = StreamingScorer(batch.runner(teacher), batch)
        scorer.restart(None, 0)
    tokens, lengths = sample_loop(s_lm, s_lm.prefill(), batch, observe=scorer and scorer.observe)
    sources = source_tags(lengths, n, STUDENT)
    stats = [{"correction_positions": [], "regenerated_tokens": 0} for _ in range(batch.size)]
    pos = torch.arange(n, device=dev)[None, :]
    for rnd in range(1, cfg.scrg_rounds + 1):
        scorer.flush(tokens)
        j, has = error_positions(tokens, lengths, scorer.kl, scorer.top)
        if not bool(has.any()):
            break
        rows = has.nonzero().flatten()
        tokens[rows, j[rows]] = scorer.top[rows, j[rows]]
        lo = int(j[rows].min())
        rescore = rnd < cfg.scrg_rounds
        if rescore:
            scorer.restart(tokens, lo)
        free_from = torch.where(has, j + 1, torch.full_like(j, n))
        tokens, lengths = sample_loop(s_lm, s_lm.logits_at(tokens, lo), batch, stream=rnd, start=lo, tokens=tokens,
                                      lengths=lengths, free_from=free_from, forced_cached=True,
                                      observe=scorer.observe if rescore else None)
        regen = has[:, None] & (pos > j[:, None])
        sources = torch.where(regen, torch.where(pos < lengths[:, None], STUDENT, PADDING), sources)
        sources[rows, j[rows]] = CORRECTED
        for b in rows.tolist():
            stats[b]["correction_positions"].append(int(j[b]))
            stats[b]["regenerated_tokens"] += int(lengths[b]) - int(j[b]) - 1
    return Decoded(tokens, lengths, sources, stats)
