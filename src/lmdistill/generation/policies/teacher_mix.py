"""``teacher_mix``: MiniLLM's teacher-mixed sampling. Each token is drawn from the mixture
``alpha * p_t + (1 - alpha) * q_t`` of the teacher's and the student's next-token distributions
(MiniLLM uses alpha = 0.2, ``SamplingConfig.teacher_mix_alpha``); both caches advance on the drawn token.

Temperature, top-k and top-p apply to the mixture. ``alpha = 0`` reproduces ``student`` and
``alpha = 1`` reproduces ``teacher`` (same noise). Tokens are tagged 0 (on-policy for the student);
``stats["teacher_mix_alpha"]`` records alpha. The trainer recomputes p and q for MiniLLM's importance weights.

``no_repeat_ngram_size = n > 0`` bans ids on the mixture (the distribution drawn from): the ids that would
repeat an n-gram of prompt + tokens so far get -inf before top-k / top-p (``sampling.NgramBan``).
"""

from __future__ import annotations

import math

import torch

from lmdistill.generation.batch import STUDENT, Batch, Decoded, mark_eos, source_tags
from lmdistill.generation.decode import ActiveRows, no_eos
from lmdistill.generation.sampling import NgramBan, pick


def mixture_logits(q: torch.Tensor, p: torch.Tensor, alpha: float) -> torch.Tensor:
    """Log of ``alpha * softmax(p) + (1 - alpha) * softmax(q)`` (a valid logits tensor)."""
    if alpha == 0.0:
        return q
    if alpha == 1.0:
        return p
    return torch.logaddexp(torch.log_softmax(p, -1) + math.log(alpha), torch.log_softmax(q, -1) + math.log1p(-alpha))


def run(student, teacher, batch: Batch) -> Decoded:
    cfg, n, v, dev = batch.config, batch.max_new_tokens, batch.vocab, batch.device
    s_lm, t_lm = batch.runner(student), batch.runner(teacher)
    q, p = s_lm.prefill(), t_lm.prefill()
    b = q.shape[0]
    tokens = torch.full((b, n), batch.pad_id, dtype=torch.long, device=dev)
    lengths = torch.full((b,), n, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    pad = torch.full((b,), batch.pad_id, dtype=torch.long, device=dev)
    temp = cfg.divergence_temperature  # the mixture of softmax(p / T) and softmax(q / T)
    rows = ActiveRows([s_lm, t_lm], batch.noise, b, ban=NgramBan.of(batch))  # finished rows leave the forward passes
    for t in range(n):
        k = rows.k
        mix = mixture_logits(q[:k, :v].float() / temp, p[:k, :v].to(dev).float() / temp, cfg.teacher_mix_alpha)
        nxt = pad.clone()
        nxt[:k] = pick(mix, cfg, None if cfg.greedy else rows.noise.gumbel(t, rows=k), scaled=True,
                       banned=rows.banned(tokens, t))
        nxt = torch.where(done, pad, nxt)
        tokens[:, t] = nxt
        done, lengths = mark_eos(nxt, t, done, lengths, batch.eos_id)
        if t == n - 1:
            break
        finished = done.all() if batch.eos_id is not None else no_eos(batch)
        stop, (tokens, lengths, done, q, p) = rows.update(~done, finished, [tokens, lengths, done, q, p])
        if stop:
            break
        q, p = rows.step(s_lm, tokens[:, t], q), rows.step(t_lm, tokens[:, t], p)
    tokens, lengths = rows.to_caller(tokens), rows.to_caller(lengths)
    rows.restore()
    stats = [{"teacher_mix_alpha": cfg.teacher_mix_alpha} for _ in range(b)]
    return Decoded(tokens, lengths, source_tags(lengths, n, STUDENT), stats)
