"""``teacher_mix``: MiniLLM's teacher-mixed sampling. Each token is drawn from the mixture
``alpha * p_t + (1 - alpha) * q_t`` of the teacher's and the student's next-token distributions
(MiniLLM uses alpha = 0.2, :class:`TeacherMixParams`); both caches advance on the drawn token.

Each model's distribution is filtered first, then they are mixed (``mixture_log_probs``), as MiniLLM's fork of
transformers does in ``sample`` (microsoft/LMOps, the fork's copy in
``dpkd/transformers/src/transformers/generation/utils.py:2940-2943`` for the student and ``:2991-2997`` for the
teacher, commit d8c4a36): ``softmax(warp(process(logits)))`` per model, warpers = temperature, top-k, top-p, and
``probs = (1 - alpha) * probs + alpha * m_probs``; the token is drawn from that mixture with no further filter.
So ``p_t`` and ``q_t`` above are the filtered, renormalised distributions: an id the top-k / top-p of one model
drops keeps the other model's share. Before issue 29 the mixture was filtered instead; both orders agree when
nothing is filtered (top-k 0, top-p 1, no n-gram ban: the MiniLLM recipe), token for token.

``alpha = 0`` reproduces ``student`` and ``alpha = 1`` reproduces ``teacher`` (same noise). Tokens are tagged 0
(on-policy for the student); ``stats["teacher_mix_alpha"]`` records alpha. The trainer recomputes p and q for
MiniLLM's importance weights.

``no_repeat_ngram_size = n > 0`` bans ids in each model's distribution before its temperature, top-k and top-p
(a logits processor, ``sampling.NgramBan``), so the mixture never draws them. The fork's non-parallel student
branch passes the raw logits to the warpers (``utils.py:2941-2942``, dropping the processors' output) where its
teacher branch and its model-parallel branch (``:2935-2936``) apply them; we apply them to both. Greedy
decoding (no warpers, as HF's greedy search) takes the argmax of the mixture of the two banned distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lmdistill.generation.batch import STUDENT, Batch, Decoded, mark_eos, source_tags
from lmdistill.generation.decode import ActiveRows, no_eos
from lmdistill.errors import ConfigError
from lmdistill.generation.config import SamplingConfig
from lmdistill.generation.policies.base import Policy
from lmdistill.generation.sampling import NgramBan, filter_logits


def mixture_logits(q: torch.Tensor, p: torch.Tensor, alpha: float) -> torch.Tensor:
    """Log of ``alpha * softmax(p) + (1 - alpha) * softmax(q)`` (a valid logits tensor)."""
    if alpha == 0.0:
        return q
    if alpha == 1.0:
        return p
    return torch.logaddexp(torch.log_softmax(p, -1) + math.log(alpha), torch.log_softmax(q, -1) + math.log1p(-alpha))


def mixture_log_probs(q: torch.Tensor, p: torch.Tensor, config: SamplingConfig, alpha: float,
                      banned: torch.Tensor | None = None) -> torch.Tensor:
    """``log(alpha * softmax(f(p)) + (1 - alpha) * softmax(f(q)))`` for student logits ``q`` and teacher logits
    ``p`` (float32, or as given when float64), ``f(x)`` = ``banned`` ids at -inf, then ``x / T``, top-k and
    top-p (``sampling.filter_logits``); greedy: the ban only. The distribution ``teacher_mix`` draws from."""
    if config.greedy:
        t, k, top_p = 1.0, 0, 1.0
    else:
        t, k, top_p = config.divergence_temperature, config.top_k, config.top_p
    cast = (lambda x: x) if q.dtype == torch.float64 else (lambda x: x.float())
    qf = filter_logits(cast(q) / t, k, top_p, banned)
    pf = filter_logits(cast(p) / t, k, top_p, banned)
    return mixture_logits(qf, pf, alpha)


@dataclass(frozen=True)
class TeacherMixParams:
    """``alpha``: the teacher's share of the mixture ``alpha * p + (1 - alpha) * q`` (MiniLLM: 0.2)."""

    alpha: float = field(default=0.2, metadata={"help": "teacher's share of the mixture (MiniLLM: 0.2)"})

    def __post_init__(self):
        if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise ConfigError(f"alpha: must be in [0, 1], got {self.alpha!r}")


def run(student, teacher, batch: Batch) -> Decoded:
    cfg, n, v, dev = batch.config, batch.max_new_tokens, batch.vocab, batch.device
    s_lm, t_lm = batch.runner(student), batch.runner(teacher)
    q, p = s_lm.prefill(), t_lm.prefill()
    b = q.shape[0]
    tokens = torch.full((b, n), batch.pad_id, dtype=torch.long, device=dev)
    lengths = torch.full((b,), n, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    pad = torch.full((b,), batch.pad_id, dtype=torch.long, device=dev)
    rows = ActiveRows([s_lm, t_lm], batch.noise, b, ban=NgramBan.of(batch))  # finished rows leave the forward passes
    for t in range(n):
        k = rows.k
        mix = mixture_log_probs(q[:k, :v], p[:k, :v].to(dev), cfg, batch.params.alpha, rows.banned(tokens, t))
        nxt = pad.clone()
        nxt[:k] = mix.argmax(-1) if cfg.greedy else (mix + rows.noise.gumbel(t, rows=k).to(dev)).argmax(-1)
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
    stats = [{"teacher_mix_alpha": batch.params.alpha} for _ in range(b)]
    return Decoded(tokens, lengths, source_tags(lengths, n, STUDENT), stats)


POLICY = Policy("teacher_mix", run, TeacherMixParams, teacher=("steps",), aliases={"alpha": ["--mix-alpha"]},
                fields=lambda params: {"mix_alpha": params.alpha})
