"""MiniLLM's policy gradient on the reverse KL (Gu et al., 2024), as a loss on sampled sequences.

The sequences y are sampled from the teacher-mixed distribution ``mix_t = alpha * p_t + (1 - alpha) * q_t``.
With r_t = log p_t(y_t) - log q_t(y_t) (no gradient) and the importance weight
w_t = clip(q_t(y_t) / mix_t(y_t), 1 - clip, 1 + clip) (no gradient):

    L = mean_t  w_t * KL(q_t || p_t)                                   (single-step term, exact over V)
      - mean_t  w_t * R_{t+1} * log q_t(y_t)                           (long-term term)
    R_{t+1} = sum_{s > t} r_s / (number of terms)    with length normalisation, else the plain sum.

Means are over masked response positions. The pretraining (SFT) term is the recipe's ``sft`` entry.
Reconstruction: the PPO-style clipping of MiniLLM is replaced by this clipped importance weight; no value
network, no reward baseline beyond length normalisation.

As a recipe term (``pg_rkl``): ``alpha`` defaults to the sampling config's ``teacher_mix_alpha`` (the distribution
the sequences were really drawn from), ``clip`` 0.2, ``length_norm`` true, ``temperature`` 1.
"""

from __future__ import annotations

import math

import torch

from lmdistill.errors import ConfigError
from lmdistill.losses.divergences import per_token_divergence
from lmdistill.losses.term import Term, TermInputs


def policy_gradient_rkl(student_logits, teacher_logits, targets, mask, *, alpha: float = 0.2, clip: float = 0.2,
                        length_norm: bool = True, temperature: float = 1.0) -> torch.Tensor:
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])   # vocabularies may differ by padding rows
    logq_v = torch.log_softmax(student_logits[..., :v].float() / temperature, -1)
    with torch.no_grad():
        logp = torch.log_softmax(teacher_logits[..., :v].float() / temperature, -1)
    tgt = targets.clamp(max=v - 1).unsqueeze(-1)
    logq_y = logq_v.gather(-1, tgt).squeeze(-1)
    with torch.no_grad():
        logp_y = logp.gather(-1, tgt).squeeze(-1)
        if alpha > 0:
            log_mix = torch.logaddexp(logp_y + math.log(alpha), logq_y + math.log1p(-alpha))
        else:
            log_mix = logq_y
        w = torch.exp(logq_y - log_mix).clamp(1 - clip, 1 + clip) * mask
        r = (logp_y - logq_y) * mask
        future = torch.flip(torch.cumsum(torch.flip(r, [-1]), -1), [-1]) - r      # sum over s > t
        if length_norm:
            n_future = torch.flip(torch.cumsum(torch.flip(mask, [-1]), -1), [-1]) - mask
            future = future / n_future.clamp(min=1)
    rkl = per_token_divergence("rkl", student_logits[..., :v], teacher_logits[..., :v], temperature=temperature)
    denom = mask.sum().clamp(min=1)
    single = (w * rkl * mask).sum() / denom
    long_term = -(w * future * logq_y * mask).sum() / denom
    return single + long_term


class PolicyGradientTerm(Term):
    """MiniLLM's ``pg_rkl`` on the sampled sequences (formula: module docstring)."""

    needs_teacher = True
    whole_logits = True   # the returns R_{t+1} sum over each sequence

    def __init__(self, *, alpha: float | None = None, clip: float = 0.2, length_norm: bool = True,
                 temperature: float = 1.0):
        super().__init__()
        self.alpha, self.clip, self.length_norm, self.temperature = alpha, clip, length_norm, temperature

    @classmethod
    def check_params(cls, params: dict, where: str) -> None:
        super().check_params(params, where)
        alpha = params.get("alpha")
        if alpha is not None and not (isinstance(alpha, (int, float)) and 0 <= alpha < 1):
            raise ConfigError(f"{where}: alpha must be in [0, 1) or null (the sampling's teacher_mix_alpha)")
        if not 0 <= params.get("clip", 0.2) < 1:
            raise ConfigError(f"{where}: clip must be in [0, 1)")

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        alpha = self.alpha if self.alpha is not None else inputs.sampling.teacher_mix_alpha
        targets, mask = inputs.targets
        return policy_gradient_rkl(inputs.student_logits, inputs.teacher_logits, targets, mask, alpha=alpha,
                                   clip=self.clip, length_norm=self.length_norm, temperature=self.temperature)
