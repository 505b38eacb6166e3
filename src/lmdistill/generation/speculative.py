"""SWITCH with speculative verification: the student drafts, the teacher checks a whole draft in one forward pass.

The rule is ``policies/switch.py``'s (the teacher writes position t when JSD(p_t, q_t) > tau_t, both candidates
drawn with position t's noise and n-gram ban); this loop computes it with fewer teacher forward passes. One
round at response position t, over the unfinished rows (the first ``k`` slots, ``decode.ActiveRows``):

1. Draft. The student writes K = min(k_draft, N - t) tokens d_t .. d_{t+K-1} exactly as it would alone:
   position t + j is ``pick(q_{t+j})`` with that position's noise and ban (whose context includes the drafts
   before it); q_{t+j} is kept. K - 1 cached student steps.
2. Verify. One teacher forward over ``[y_{t-1}, d_t, .., d_{t+K-2}]`` (``CachedLM.extend``; at t = 0 the
   prefill's logits are p_0 and only the drafts are fed) gives p_t .. p_{t+K-1}. (At t = 0, where p_0 is known
   before drafting, a row firing there makes the first round one token long and costs no teacher pass.)
3. Decide. fire_{t+j} = JSD(p_{t+j}, q_{t+j}) > tau_{t+j} (unbanned, as in ``switch.py``), counted only up to
   the row's first drafted EOS (what the student drafted after it is not part of the row). f_b: row b's first
   firing offset, K if none.
4. Accept, batch-aligned: m = min_b f_b. Every row keeps offsets 0 .. m - 1 (its drafts) and offset m (if
   m < K): the teacher's pick (same noise, same ban) where f_b = m, its own draft where f_b > m. Drafts after
   offset m are dropped; rows end at the first EOS among what they keep.
5. Both caches are cropped back to the kept prefix (``CachedLM.crop``); the student steps on the last kept
   token (its q_{t+m+1} for the next draft), the teacher feeds it first in its next verification.

Why the output is ``stepwise``'s: every kept position was decided by the rule on the same q and p (their
context is the same kept tokens), the same noise and the same ban. Before offset m no row fired (m is the
minimum), so the rule picks the student's token there, which is the draft; at offset m it picks the teacher's
where it fired and the student's (the draft) where it did not. A row's noise, ban and logits are its own, so
neither the batch nor the draft length changes its tokens. Tested exactly in float64
(tests/test_switch_speculative.py). In float32 the multi-token forward rounds differently from single steps
(other matmul shapes, other reduction order; the JSD moves by ~4e-9 on the bench's tiny models), so a JSD
within that of tau_t, or a near-tie in a pick, can go the other way: the output is then a correct SWITCH
sample, not the same one. bench/generation.py reports how often the two agree.

Why batch-aligned: both caches keep one column per response position for every row (``FastDecoder``'s
shared columns, ``DynamicCache.crop``), so rows advance together. Any such lockstep loop needs a teacher
forward for every position where some row takes a teacher token (its next p depends on that token), so
teacher forwards per token are at least P(some row fires at a position) ~ 1 - (1 - f)^B for a per-token
teacher share f and B rows: speculation saves teacher passes when takeovers are rare across the batch
(small batches, a student close to the teacher, a high tau), and next to nothing at B = 8 and f ~ 0.4,
where k falls to 1: one student and one teacher forward per token, ``stepwise``'s cost. Rows advancing
independently would need per-row cache offsets (left open).

Draft length: starts at ``draft_tokens``; a round where no row fired (the whole draft kept) grows it by
2, a round that fired shrinks it by 1, within ``[draft_min, draft_tokens]`` (the rule of
transformers' assisted generation, ``num_assistant_tokens``). It depends only on the firing positions, so a
run repeats exactly. A round costs K student forwards (K - 1 drafting, one step after; none after the last
round) and one teacher forward over K tokens for m + 1 tokens (K if none fired).
"""

from __future__ import annotations

import torch

from lmdistill.generation.batch import PADDING, STUDENT, TEACHER, Batch, mark_eos
from lmdistill.generation.decode import ActiveRows, no_eos
from lmdistill.generation.sampling import NgramBan, pick
from lmdistill.losses import per_token_divergence


class DraftLength:
    """k, the tokens the student drafts next: +2 after a round whose draft was kept whole, -1 after one that fired."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi, self.k = lo, hi, hi

    def update(self, kept_whole: bool) -> None:
        self.k = min(self.hi, self.k + 2) if kept_whole else max(self.lo, self.k - 1)


def output_buffers(batch: Batch, b: int) -> tuple[torch.Tensor, ...]:
    """SWITCH's per-row state for ``b`` rows: tokens (pad), sources (PADDING), JSD trace (0), lengths (the maximum),
    done (False), and a column of pad ids."""
    n, dev = batch.max_new_tokens, batch.device
    return (torch.full((b, n), batch.pad_id, dtype=torch.long, device=dev),
            torch.full((b, n), PADDING, dtype=torch.long, device=dev),
            torch.zeros((b, n), dtype=torch.float32, device=dev),
            torch.full((b,), n, dtype=torch.long, device=dev),
            torch.zeros(b, dtype=torch.bool, device=dev),
            torch.full((b,), batch.pad_id, dtype=torch.long, device=dev))


def run(student, teacher, batch: Batch):
    """``(tokens, sources, trace, lengths, teacher_forwards, student_forwards)``, as ``switch.stepwise``."""
    cfg, n, v, dev, eos = batch.config, batch.max_new_tokens, batch.vocab, batch.device, batch.eos_id
    s_lm, t_lm = batch.runner(student), batch.runner(teacher)
    q, p0 = s_lm.prefill(), t_lm.prefill()  # q: the student's logits for the next position; p0: the teacher's for 0
    b = q.shape[0]

    def jsd(q, p):  # the rule's divergence, unbanned (see switch.py)
        return per_token_divergence("jsd", q, p, temperature=cfg.divergence_temperature, beta=0.5)

    tokens, sources, trace, lengths, done, pad = output_buffers(batch, b)
    rounds = []  # (start, size, teacher pass) of every round, for the forward counts
    rows = ActiveRows([s_lm, t_lm], batch.noise, b, ban=NgramBan.of(batch))
    draft = DraftLength(batch.params.draft_min, batch.params.draft_tokens)
    t = 0
    while True:
        k, size = rows.k, min(draft.k, n - t)
        live = ~done[:k]  # all true where finished rows leave; the HF backend keeps them in the batch
        if t == 0 and size > 1 and bool((jsd(q[:, :v], p0[:, :v].to(dev)) > batch.params.threshold(0)).any()):
            size = 1  # p_0 is known from the prefill: a row that fires at 0 makes the first round one token
        # 1. the student drafts positions t .. t + size - 1
        qs, noise, banned = [], [], []
        for j in range(size):
            qs.append((q[:k] if j == 0 else s_lm.step(tokens[:, t + j - 1], rows=k))[:, :v])
            noise.append(None if cfg.greedy else rows.noise.gumbel(t + j, rows=k))
            banned.append(rows.banned(tokens, t + j))
            tokens[:k, t + j] = torch.where(live, pick(qs[j], cfg, noise[j], banned=banned[j]), pad[:k])
        # 2. one teacher forward gives p_t .. p_{t + size - 1}
        if t == 0:
            p = p0[:k, None]
            if size > 1:
                p = torch.cat([p, t_lm.extend(tokens[:, :size - 1], rows=k)], 1)
        else:
            p = t_lm.extend(tokens[:, t - 1:t + size - 1], rows=k)
        rounds.append((t, size, t > 0 or size > 1))
        p = p[:, :, :v].to(dev)
        # 3. where the rule fires (unbanned JSD; offsets after a drafted EOS are not the row's)
        d = jsd(torch.stack(qs, 1), p)  # [k, size]
        tau = torch.tensor([batch.params.threshold(t + j) for j in range(size)], dtype=d.dtype, device=dev)  # d's rounding,
        fire = (d > tau) & live[:, None]  # as stepwise's ``d > float`` compares in d's dtype
        if eos is not None:
            is_eos = (tokens[:k, t:t + size] == eos).long()
            fire &= (is_eos.cumsum(1) - is_eos) == 0
        first = torch.where(fire, torch.arange(size, device=dev), size).min(1).values  # f_b (size: none)
        m = int(first.min())  # the round's host sync (ActiveRows.update has the other)
        keep = min(m + 1, size)
        # 4. keep offsets 0 .. keep - 1: the drafts, and at offset m the teacher's pick where it fired there
        takes = first == m
        if m < size:
            tokens[:k, t + m] = torch.where(takes, pick(p[:, m], cfg, noise[m], banned=banned[m]), tokens[:k, t + m])
        tokens[:k, t + keep:t + size] = batch.pad_id
        for j in range(keep):
            sources[:k, t + j] = torch.where(takes & (j == m), TEACHER, STUDENT)
            sources[:, t + j] = torch.where(done, PADDING, sources[:, t + j])
            tokens[:, t + j] = torch.where(done, pad, tokens[:, t + j])
            trace[:k, t + j] = d[:, j]
            done, lengths = mark_eos(tokens[:, t + j], t + j, done, lengths, eos)
        draft.update(kept_whole=m == size)
        t += keep
        if t >= n:
            break
        finished = done.all() if eos is not None else no_eos(batch)
        stop, (tokens, sources, trace, lengths, done, q) = rows.update(
            ~done, finished, [tokens, sources, trace, lengths, done, q])
        if stop:
            break
        # 5. back to the kept prefix: both caches hold tokens[:, :t - 1]; the student steps on token t - 1
        s_lm.crop(t - 1)
        t_lm.crop(t - 1)
        q = rows.step(s_lm, tokens[:, t - 1], q)
    tokens, sources, trace, lengths = (rows.to_caller(x) for x in (tokens, sources, trace, lengths))
    rows.restore()
    return tokens, sources, trace, lengths, *forward_counts(rounds, lengths)


def forward_counts(rounds: list[tuple[int, int, bool]], lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's teacher and student forward passes (prefills included) while it was unfinished.

    A row of length L takes part in the rounds that start before L (it ends inside the last of them, then
    leaves): in each, K - 1 drafting steps and the teacher pass (none in a one-token first round), and before
    each but the first, the student step on the previous round's last token.
    """
    teacher, student = [], []
    for n in lengths.tolist():
        mine = [(size, tp) for t, size, tp in rounds if t < n]
        teacher.append(1 + sum(tp for _, tp in mine))
        student.append(1 + sum(size - 1 for size, _ in mine) + len(mine) - 1)
    return torch.tensor(teacher, dtype=torch.long), torch.tensor(student, dtype=torch.long)
