"""``switch``: SWITCH (arXiv 2410.19503), the student writes and the teacher steps in.

At response step t both models give next-token logits over the shared vocabulary. When
``JSD(p_t, q_t) > tau_t = switch_tau0 * exp(-switch_decay * t)`` the token is sampled from the teacher, otherwise
from the student.

Our choices (docs/METHODS.md leaves them open): the JSD is the symmetric one (beta = 0.5, in nats, between
0 and ln 2) of ``softmax(logits / T)`` at the sampling temperature T (T = 1 when greedy), computed by
``lmdistill.losses.per_token_divergence("jsd", ...)``; the student's and the teacher's candidate tokens
are drawn with the same noise, so ``switch_tau0 = inf`` reproduces ``student`` and ``switch_tau0 < 0`` ``teacher``
token for token. ``stats["jsd"]`` is the per-step trace and ``stats["teacher_fraction"]`` the share of
teacher tokens. Rows that finished at EOS leave both models' forward passes (``decode.ActiveRows``).

``no_repeat_ngram_size = n > 0``: whichever model writes step t draws from its own distribution with the
row's banned ids (those that would repeat an n-gram of prompt + tokens so far; ``sampling.NgramBan``) set to
-inf, so the response never repeats an n-gram. The JSD that decides who writes is computed on the unbanned
distributions: it measures how far the two models disagree, and the ban (the same ids for both, as they share
the context) is a decoding constraint, not part of either model; banning first would also renormalise both
over the allowed ids and make the trace depend on n. ``stats["jsd"]`` is therefore the same with and without a
ban for the same tokens.

Two loops compute this rule, with the same tokens, sources, trace and lengths (exactly in float64; float32
rounding of a multi-token forward differs from single steps, see ``generation/speculative.py``):

- ``switch_draft_tokens = 0``: ``stepwise`` below, one cached step per model per token.
- ``switch_draft_tokens = k_max > 0`` (the default): ``speculative.run``. The student drafts up to k tokens
  exactly as it would write them alone; the teacher scores all k positions in one forward pass; the first
  position where the rule fires takes the teacher's token and the drafts after it are dropped.

``stats["teacher_forwards"]`` / ``stats["student_forwards"]``: the forward passes (prefill included) each model
ran while the row was unfinished; per generated token that is 1 for ``stepwise``.
"""

from __future__ import annotations

import torch

from lmdistill.generation import speculative
from lmdistill.generation.batch import PADDING, STUDENT, TEACHER, Batch, Decoded, mark_eos
from lmdistill.generation.decode import ActiveRows, no_eos
from lmdistill.generation.sampling import NgramBan, pick
from lmdistill.losses import per_token_divergence


def run(student, teacher, batch: Batch) -> Decoded:
    loop = speculative.run if batch.config.switch_draft_tokens else stepwise
    return decoded(*loop(student, teacher, batch))


def decoded(tokens, sources, trace, lengths, teacher_forwards, student_forwards) -> Decoded:
    """The policy's result from what both loops return (per-row tensors in the caller's row order)."""
    stats = [{"jsd": row[:k], "teacher_tokens": sum(1 for x in src[:k] if x == TEACHER),
              "teacher_forwards": tf, "student_forwards": sf}
             for row, src, k, tf, sf in zip(trace.tolist(), sources.tolist(), lengths.tolist(),
                                            teacher_forwards.tolist(), student_forwards.tolist())]
    return Decoded(tokens, lengths, sources, stats)


def stepwise(student, teacher, batch: Batch):
    """``(tokens, sources, trace, lengths, teacher_forwards, student_forwards)``, one step per model per token."""
    cfg, n, v, dev = batch.config, batch.max_new_tokens, batch.vocab, batch.device
    s_lm, t_lm = batch.runner(student), batch.runner(teacher)
    q, p = s_lm.prefill(), t_lm.prefill()
    b = q.shape[0]
    temp = cfg.divergence_temperature
    tokens, sources, trace, lengths, done, pad = speculative.output_buffers(batch, b)
    tags = torch.tensor([STUDENT, TEACHER], dtype=torch.long, device=dev)
    rows = ActiveRows([s_lm, t_lm], batch.noise, b, ban=NgramBan.of(batch))  # finished rows leave the forward passes
    for t in range(n):
        k = rows.k  # the unfinished rows are slots [:k]
        qk, pk = q[:k, :v], p[:k, :v].to(dev)
        d = per_token_divergence("jsd", qk, pk, temperature=temp, beta=0.5)  # unbanned (see the docstring)
        use_teacher = d > cfg.threshold(t)
        noise = None if cfg.greedy else rows.noise.gumbel(t, rows=k)
        banned = rows.banned(tokens, t)
        nxt = pad.clone()
        nxt[:k] = torch.where(use_teacher, pick(pk, cfg, noise, banned=banned), pick(qk, cfg, noise, banned=banned))
        nxt = torch.where(done, pad, nxt)
        tokens[:, t] = nxt
        sources[:k, t] = tags[use_teacher.long()]
        sources[:, t] = torch.where(done, PADDING, sources[:, t])
        trace[:k, t] = d
        done, lengths = mark_eos(nxt, t, done, lengths, batch.eos_id)
        if t == n - 1:
            break
        finished = done.all() if batch.eos_id is not None else no_eos(batch)
        stop, (tokens, sources, trace, lengths, done, q, p) = rows.update(
            ~done, finished, [tokens, sources, trace, lengths, done, q, p])
        if stop:
            break
        q, p = rows.step(s_lm, tokens[:, t], q), rows.step(t_lm, tokens[:, t], p)
    tokens, sources, trace, lengths = (rows.to_caller(x) for x in (tokens, sources, trace, lengths))
    rows.restore()
    # a row of length L took part in the prefill and L - 1 steps of each model
    return tokens, sources, trace, lengths, lengths, lengths
