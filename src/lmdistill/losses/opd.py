"""On-policy distillation on sampled tokens (``opd``): the teacher grades each token the student sampled.

As Thinking Machines' Tinker cookbook runs it (``tinker_cookbook/distillation/train_on_policy.py``,
``incorporate_kl_penalty``, lines 86-108; ``tinker_cookbook/rl/metrics.py:192-211``,
``discounted_future_sum_vectorized``; tinker-cookbook commit 9dfcc3a). For a sequence the student sampled, with x_t
its token at trained position t (mask m_t), q the student, p the teacher, both at temperature 1, and gamma =
``discount``:

    a_t = -m_t (log q(x_t) - log p(x_t))          negative per-token reverse KL   (train_on_policy.py:91-96, 103)
    A_t = a_t                                     gamma = 0 (Tinker's default kl_discount_factor 0.0)
    A_t = sum_{k >= 0} gamma^k a_{t+k}            gamma > 0: discounted future sum (train_on_policy.py:104-105,
                                                  metrics.py:195: position t counts itself, undiscounted)
    rho_t = exp(log q(x_t) - sg(log b(x_t)))      b: the distribution x_t was sampled from
    L = -(1/N) sum_t sg(A_t) rho_t                N: the trained tokens (Tinker's ``importance_sampling`` loss,
                                                  summed there, averaged here)

The gradient is the policy gradient ``-(1/N) sum_t sg(A_t) grad log q(x_t)`` when b = q (rho = 1): the student samples
at temperature 1 with no filter, as the ``opd`` recipe does. Its expectation over x ~ q is ``grad KL(q || p)`` at each
position (the single-step case; ``discount: 1`` gives the sequence-level KL's), ``tests/test_opd.py`` checks it by
Monte Carlo. At rho = 1 the loss's value is the sampled reverse KL, ``mean_t (log q - log p)`` (undiscounted).

Sampling at another temperature T draws from b = softmax(z / T), which differs from q: rho corrects for it (its
denominator from the same logits, no gradient). Top-k, top-p and the n-gram ban would change b in ways this term
does not see, and sequences the student did not sample (gold, the teacher's, a replay buffer) have no b at all: the
config check refuses those (``check_sequences``). ``clip`` (PPO's epsilon, null = off, the default as in Tinker's
recipe) takes ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))``, which changes nothing while rho = 1.

The teacher is asked only for log p(x_t) (``TermInputs.teacher_token_logprobs``): a gather of a local teacher's logits,
or one score per token from a server (``echo`` with ``logprobs: 0``, vLLM's ``prompt_logprobs: 0``). log q is over the
vocabulary the student samples from (the shared prefix with a local teacher, or ``sampling.vocab_size``), log p over
the teacher's whole vocabulary, as a server computes it.

Compared with the other references: TRL's MiniLLM ``rkl_advantage`` (``trl/experimental/minillm/minillm_trainer.py:
291-346``, TRL commit f2cd577) takes the same reward but multiplies it by gamma^i at the absolute position i before
the reverse cumulative sum (so A_t carries a factor gamma^t unless length-normalised, its default) and adds it to
GRPO's advantage; NeMo-RL's ``adv_estimator: opd`` (``nemo_rl/algorithms/advantage_estimator.py:551-611``,
NVIDIA-NeMo/RL commit 7ea279a) is the undiscounted sg(log p - log q) with its importance-sampling truncation left to
the loss. We follow Tinker.
"""

from __future__ import annotations

import math

import torch

from lmdistill.errors import ConfigError
from lmdistill.losses.policy_gradient import discounted_returns
from lmdistill.losses.term import Term, TermInputs
from lmdistill.losses.vocab import shared_vocab


def opd_advantages(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor,
                   discount: float = 0.0) -> torch.Tensor:
    """``A_t`` (module docstring) for ``[B, T]`` log-probabilities of the sampled tokens and mask, no gradient."""
    with torch.no_grad():
        m = mask.to(student_logprobs.dtype)
        a = -m * (student_logprobs - teacher_logprobs.to(student_logprobs.dtype))
        return discounted_returns(a, discount) if discount > 0 else a


def opd_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor,
             *, discount: float = 0.0, clip: float | None = None, temperature: float = 1.0,
             vocab: int | None = None) -> torch.Tensor:
    """``L`` (module docstring) from the student's ``[N, V]`` logits at the ``N`` trained positions of ``mask``
    (``[B, T]``, row-major), the sampled ``targets`` ``[N]`` and the teacher's ``log p(x_t)`` ``[N]``;
    ``temperature``: the one the tokens were sampled at; ``vocab``: the ids they were sampled among (a prefix)."""
    v = vocab or student_logits.shape[-1]
    z = student_logits[..., :v]
    z = z if z.dtype == torch.float64 else z.float()
    idx = targets[:, None]
    logq = torch.log_softmax(z, -1).gather(-1, idx)[:, 0]
    with torch.no_grad():
        logb = logq.detach() if temperature == 1.0 else torch.log_softmax(z / temperature, -1).gather(-1, idx)[:, 0]
        sel = mask.bool()
        per_row = torch.zeros(mask.shape, dtype=logq.dtype, device=logq.device)
        lp_q, lp_p = per_row.clone(), per_row.clone()
        lp_q[sel], lp_p[sel] = logq.detach(), teacher_logprobs.to(logq)
        adv = opd_advantages(lp_q, lp_p, mask, discount)[sel]
    ratio = torch.exp(logq - logb)
    loss = -adv * ratio
    if clip is not None:
        loss = torch.maximum(loss, -adv * ratio.clamp(1.0 - clip, 1.0 + clip))
    return loss.sum() / max(int(sel.sum()), 1)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class OPDTerm(Term):
    """On-policy distillation on the student's sampled tokens (formula, references: module docstring)."""

    needs_teacher = True

    def __init__(self, *, discount: float = 0.0, clip: float | None = None):
        super().__init__()
        self.discount, self.clip = discount, clip

    @classmethod
    def teacher_needs(cls, params: dict) -> tuple[tuple[str, ...], float | None]:
        return ("token_logprobs", "logits"), 1.0

    @classmethod
    def check_params(cls, params: dict, where: str) -> None:
        super().check_params(params, where)
        d = {**cls.param_names(), **params}
        if not (_number(d["discount"]) and 0 <= d["discount"] <= 1):
            raise ConfigError(f"{where}: discount must be in [0, 1] (0: none, Tinker's kl_discount_factor), "
                              f"got {d['discount']!r}")
        if d["clip"] is not None and not (_number(d["clip"]) and 0 < d["clip"] < 1):
            raise ConfigError(f"{where}: clip must be in (0, 1) (PPO's epsilon) or null (off), got {d['clip']!r}")

    @classmethod
    def check_sequences(cls, params: dict, policy: str, sampling, where: str) -> None:
        if policy != "student":
            raise ConfigError(f"{where}: opd is an on-policy estimator: its sequences must be the student's own "
                              f"samples (policy: student), got policy {policy!r}")
        bad = [f"sampling.{k}={getattr(sampling, k)!r}" for k, off in
               (("top_k", 0), ("top_p", 1.0), ("no_repeat_ngram_size", 0)) if getattr(sampling, k) != off]
        if sampling.greedy:
            bad.insert(0, "greedy decoding (sampling.do_sample=false or temperature=0)")
        if bad:
            raise ConfigError(f"{where}: opd corrects for the sampling temperature only, not for {', '.join(bad)} "
                              "(each changes the distribution the tokens are drawn from); sample with top_k=0, "
                              "top_p=1.0, no_repeat_ngram_size=0 and a temperature > 0")

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        targets, mask = inputs.targets
        logits = inputs.student_logits if not inputs.whole else inputs.student_logits[mask.bool()]
        v = logits.shape[-1]
        if inputs.teacher.vocab:   # a local teacher samples with the student among the shared ids
            v = shared_vocab(v, inputs.teacher.vocab)
        sampling = inputs.sampling
        if sampling is not None and sampling.vocab_size:
            v = min(v, sampling.vocab_size)
        temperature = 1.0 if sampling is None or sampling.greedy else float(sampling.temperature)
        return opd_loss(logits, targets[mask.bool()], inputs.teacher_token_logprobs, mask, discount=self.discount,
                        clip=self.clip, temperature=temperature, vocab=v)

    def extra_repr(self) -> str:
        return f"discount={self.discount}, clip={self.clip}"
