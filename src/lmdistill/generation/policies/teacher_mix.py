"""``teacher_mix``: MiniLLM's teacher-mixed sampling. Each token is drawn from the mixture
``alpha * p_t + (1 - alpha) * q_t`` of the teacher's and the student's next-token distributions
(MiniLLM uses alpha = 0.2, ``SamplingConfig.mix_alpha``); both caches advance on the drawn token.

Temperature, top-k and top-p apply to the mixture. ``alpha = 0`` reproduces ``student`` and
``alpha = 1`` reproduces ``teacher`` (same noise). Tokens are tagged 0 (on-policy for the student);
``stats["mix_alpha"]`` records alpha. The trainer recomputes p and q for MiniLLM's importance weights.
"""

from __future__ import annotations

import math

import torch

from lmdistill.generation.batch import STUDENT, Batch, Decoded, mark_eos, source_tags
from lmdistill.generation.sampling import pick


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
    for t in range(n):
        temp = cfg.divergence_temperature  # the mixture of softmax(p / T) and softmax(q / T)
        mix = mixture_logits(q[:, :v].float() / temp, p[:, :v].to(dev).float() / temp, cfg.mix_alpha)
        nxt = pick(mix, cfg, None if cfg.greedy else batch.noise.gumbel(t), scaled=True)
        nxt = torch.where(done, torch.full_like(nxt, batch.pad_id), nxt)
        tokens[:, t] = nxt
        done, lengths = mark_eos(nxt, t, done, lengths, batch.eos_id)
        if t == n - 1 or (batch.eos_id is not None and bool(done.all())):
            break
        q, p = s_lm.step(nxt), t_lm.step(nxt)
    stats = [{"mix_alpha": cfg.mix_alpha} for _ in range(b)]
    return Decoded(tokens, lengths, source_tags(lengths, n, STUDENT), stats)
