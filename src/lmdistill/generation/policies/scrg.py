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
4. ``rounds`` rounds; a round that has another after it re-scores the positions from the
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

A teacher that scores whole sequences (``batch.scorer``: a served teacher, ``teachers/served.py``)
instead of running in this process: after the student has written, one request per row returns the teacher's top-k
log-probabilities at every response position (:class:`SequenceScorer`); the student's logits at those positions
come from one pass over its own tokens, d_t is the forward KL on the K + 1 bins (the K listed ids and the tail,
``losses.sparse``) and the teacher's argmax is its most likely listed id the ban allows. With K covering the
vocabulary this is the local path's d_t and argmax (tests/test_scrg_served.py checks the tokens are identical in
float64); with K < V a merged tail can only lower d_t.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmdistill.generation.batch import CORRECTED, PADDING, STUDENT, Batch, Decoded, source_tags
from lmdistill.generation.decode import sample_loop
from lmdistill.generation.policies.base import Policy
from lmdistill.generation.runner import CachedLM
from lmdistill.generation.sampling import NgramBan
from lmdistill.errors import ConfigError
from lmdistill.losses import per_token_divergence
from lmdistill.losses.sparse import sparse_per_token

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

    def flush(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
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


class SequenceScorer:
    """SCRG's d_t and teacher argmax from a teacher that scores whole sequences.

    ``teacher.sequence_scores(sequences, wanted)`` takes unpadded token lists (prompt + response) and, per row, the
    indices of the positions to score; it returns a :class:`~lmdistill.losses.sparse.SparseTeacher` over those
    positions in row-major order (position i: the teacher's top-k of token i given the tokens before it).
    ``restart(tokens, t)`` marks position ``t`` as the first to score again; ``flush(tokens, lengths)`` scores every
    response position from there to each row's end (one request per row, then the student's logits in chunks of
    ``SCORE_CHUNK`` positions: ``O(B * SCORE_CHUNK * V)`` memory, as the streaming scorer).
    """

    observe = None   # nothing to do while the student writes

    def __init__(self, teacher, student: CachedLM, batch: Batch, chunk: int = SCORE_CHUNK):
        self.teacher, self.student, self.vocab, self.chunk = teacher, student, batch.vocab, chunk
        self.temperature = batch.config.divergence_temperature
        n = batch.max_new_tokens
        self.kl = torch.zeros((batch.size, n), dtype=torch.float32, device=batch.device)
        self.top = torch.zeros((batch.size, n), dtype=torch.long, device=batch.device)
        self.prompts = [row[mask.bool()].tolist() for row, mask in zip(batch.prompt_ids, batch.prompt_mask)]
        self.ban = NgramBan.of(batch)
        self.start = 0

    def restart(self, tokens: torch.Tensor | None, t: int) -> None:
        self.start = t

    def flush(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        a = self.start
        ends = [int(x) for x in lengths.tolist()]
        top_end = max(ends)
        if top_end <= a:
            return
        seqs = [p + tokens[b, :ends[b]].tolist() for b, p in enumerate(self.prompts)]
        wanted = [[len(p) + t for t in range(a, ends[b])] for b, p in enumerate(self.prompts)]
        sparse = self.teacher.sequence_scores(seqs, wanted)
        if sparse.temperature != self.temperature:
            raise ConfigError(f"SCRG: the teacher scored at temperature {sparse.temperature}, the student samples at "
                              f"{self.temperature}; sample at that temperature (or greedy) or use a local teacher")
        if bool((sparse.ids >= self.vocab).any()):
            raise ConfigError(f"SCRG: the teacher listed token ids past the shared vocabulary ({self.vocab}); "
                              "teacher and student must share the tokenizer")
        offsets = torch.tensor([0] + [len(w) for w in wanted], dtype=torch.long).cumsum(0)
        pending = self.student.logits_at(tokens, a)
        for c in range(a, top_end, self.chunk):
            k = min(self.chunk, top_end - c)
            ahead = self.student.extend(tokens[:, c:c + k])          # predicts c+1 .. c+k
            q = torch.cat([pending[:, None], ahead[:, :-1]], 1)[:, :, :self.vocab].to(self.kl.device)
            pending = ahead[:, -1]
            for i in range(k):
                t = c + i
                rows = [b for b in range(len(ends)) if t < ends[b]]
                if not rows:
                    break
                idx = torch.tensor([int(offsets[b]) + t - a for b in rows], dtype=torch.long)
                teacher_t = sparse.index_select(idx)
                r = torch.tensor(rows, dtype=torch.long, device=self.kl.device)
                self.kl[r, t] = sparse_per_token("fkl", q[r, i], teacher_t.to(q.device),
                                                 temperature=self.temperature).to(self.kl.dtype)
                self.top[r, t] = self._best_allowed(teacher_t, tokens, r, t)
        self.start = top_end

    def _best_allowed(self, teacher_t, tokens: torch.Tensor, rows: torch.Tensor, t: int) -> torch.Tensor:
        """The most likely listed id at position ``t`` of ``rows`` that the n-gram ban allows; where none is, the
        row's own token (so the position is no candidate)."""
        ids = teacher_t.ids.to(tokens.device)
        lps = teacher_t.logprobs.to(tokens.device)
        blocked = torch.isneginf(lps)
        if self.ban is not None:
            banned = self.ban.mask(tokens[:, :t]).to(tokens.device)[rows]
            blocked = blocked | banned.gather(1, ids)
        score = lps.masked_fill(blocked, float("-inf"))
        best = ids.gather(1, score.argmax(1, keepdim=True)).squeeze(1)
        return torch.where(blocked.all(1), tokens[rows, t], best)


def error_positions(tokens: torch.Tensor, lengths: torch.Tensor, kl: torch.Tensor,
                    teacher_top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(j [B], has_candidate [B])``: the argmax of ``kl`` over positions (within each row's length)
    whose token differs from ``teacher_top``. ``j`` is -1 where no position qualifies."""
    valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
    candidate = valid & (tokens != teacher_top)
    j = torch.where(candidate, kl, torch.full_like(kl, float("-inf"))).argmax(-1)
    has = candidate.any(-1)
    return torch.where(has, j, torch.full_like(j, -1)), has


@dataclass(frozen=True)
class ScrgParams:
    """``rounds``: rounds of correction + re-generation (0: the student's sample unchanged)."""

    rounds: int = field(default=1, metadata={"help": "correction + re-generation rounds"})

    def __post_init__(self):
        if not isinstance(self.rounds, int) or self.rounds < 0:
            raise ConfigError(f"rounds: must be an integer >= 0, got {self.rounds!r}")


def run(student, teacher, batch: Batch) -> Decoded:
    """With a ``teacher`` model the streaming scorer; without one, ``batch.scorer`` (a teacher scoring whole
    sequences: :class:`SequenceScorer`)."""
    rounds, n, dev = batch.params.rounds, batch.max_new_tokens, batch.device
    s_lm = batch.runner(student)
    scorer = None
    if rounds > 0:
        scorer = StreamingScorer(batch.runner(teacher), batch) if teacher is not None else \
            SequenceScorer(batch.scorer, s_lm, batch)
        scorer.restart(None, 0)
    tokens, lengths = sample_loop(s_lm, s_lm.prefill(), batch, observe=scorer and scorer.observe)
    sources = source_tags(lengths, n, STUDENT)
    stats = [{"correction_positions": [], "regenerated_tokens": 0} for _ in range(batch.size)]
    pos = torch.arange(n, device=dev)[None, :]
    for rnd in range(1, rounds + 1):
        scorer.flush(tokens, lengths)
        j, has = error_positions(tokens, lengths, scorer.kl, scorer.top)
        if not bool(has.any()):
            break
        rows = has.nonzero().flatten()
        tokens[rows, j[rows]] = scorer.top[rows, j[rows]]
        lo = int(j[rows].min())
        rescore = rnd < rounds
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


POLICY = Policy("scrg", run, ScrgParams, teacher=("steps", "sequence_scores"), aliases={"rounds": ["--n-corrections"]})
