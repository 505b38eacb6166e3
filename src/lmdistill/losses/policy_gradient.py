"""MiniLLM's policy gradient on the reverse KL (Gu et al., 2024), as microsoft/LMOps ``minillm/`` computes it.

Transcribes ``minillm/minillm/losses.py`` (``Loss.ppo_loss``, ``_get_advantages_and_returns``, ``_pg_loss``,
``_reg_loss``), ``minillm/minillm/sampler.py`` (rewards and importance weights at rollout time) and
``minillm/minillm/utils.py`` (``whiten``). Per response position t of a sampled sequence y (mask m_t), with
q the student, q_old the student that sampled the rollout (behaviour policy, stored log-probs), p the teacher,
all ``softmax(logits / temperature)``, and alpha the teacher share of the sampling mixture:

    mix_t  = (1 - alpha) q_old(y_t) + alpha p(y_t)                                    (sampler.py:112)
    w_t    = q_old(y_t) / mix_t                      importance weight, not clipped   (sampler.py:114-115)
    r_t    = clip((log p(y_t) - log q_old(y_t)) / reward_scaling, +-cliprange_reward) (sampler.py:121-131)
    R_t    = r_t + gamma R_{t+1}                     over the response, R after it 0  (losses.py:43-46)
    A_t    = R_t / n_t,  n_t = sum_{s >= t} m_s      length normalisation             (losses.py:39-41, 49)
    A      = (A - mean) / sqrt(var + 1e-8)            whitening                        (utils.py:87-97)
    rho_t  = exp(log q(y_t) - log q_old(y_t)) w_t                                      (losses.py:72-74)
    L_pg   = sum_t m_t max(-A_t rho_t, -A_t clip(rho_t, 1 - clip, 1 + clip)) / sum_t m_t (losses.py:88-94)
    L_reg  = sum_t m_t KL(q_t || p_t) / sum_t m_t     exact over the vocabulary        (losses.py:98-108)
    L      = L_pg + L_reg                             (``single_step``; losses.py:169-173)

r, w, A and rho's q_old are constants (no gradient); the gradient flows through log q(y_t) in rho and through q in
L_reg. The reference's teacher reward ignores the temperature (reward.py:38-74) while its student log-probs divide
by it; here both use ``temperature`` (the same at the scripts' 1.0). Whitening (``whiten``):

- ``window`` (the reference): mean and variance over every position of the micro-batch's response window, the
  ``rows x window`` tensor the reference holds (its responses are padded to max_length - max_prompt_length, and
  advantages are 0 after a response), so the padding's zeros count; the variance divides by the count (the
  reference always runs under torch.distributed, where ``whiten`` takes ``get_global_statistics``, utils.py:72-84,
  over all processes); ``shift_mean`` is True, so the mean stays subtracted. ``window`` defaults to the sampling's
  ``max_new_tokens``.
- ``tokens``: the same over the masked response tokens only; ``none``: no whitening.

With several processes the statistics are summed over them, as the reference's. ``length_norm: false`` drops
the ``/ n_t`` (the reference divides unconditionally; its ``--length-norm`` only normalises the logged reward and
reverse KL, losses.py:182-184). Where the sequences carry no stored behaviour log-probs (``old_logprobs`` in the
batch, set by the ``rollout`` source), q_old is the current student, detached: the reference's first PPO epoch.

As a recipe term (``pg_rkl``): ``alpha`` defaults to the behaviour mixture's share, the batch field ``mix_alpha`` of
the ``teacher_mix`` and ``rollout`` policies. The PPO schedule (``ppo_epochs``, ``num_rollouts``) belongs to the
``rollout`` policy (``train/rollout.py``), whose stored ``old_logprobs`` must be at the term's ``temperature``.
Defaults are what ``minillm/scripts/gpt2/minillm/train_*.sh`` run: cliprange 0.2 and gamma 0.95 (arguments.py:
156, 158), ``--reward-scaling 0.5 --cliprange-reward 100``, ``--ppo-epochs 4``, ``--single-step-reg``, temperature 1.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from lmdistill.errors import ConfigError
from lmdistill.losses.divergences import per_token_divergence
from lmdistill.losses.term import Term, TermInputs
from lmdistill.runtime import rank_world

WHITEN = ("window", "tokens", "none")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab: int, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits[..., :vocab] / temperature)`` at ``targets`` (float32; float64 stays float64)."""
    x = logits[..., :vocab]
    x = x if x.dtype == torch.float64 else x.float()
    return torch.log_softmax(x / temperature, -1).gather(-1, targets.clamp(max=vocab - 1).unsqueeze(-1)).squeeze(-1)


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """``R_t = r_t + gamma R_{t+1}`` along the last dimension, ``R`` past the end 0 (losses.py:43-48)."""
    out = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        last = rewards[..., t] + gamma * last
        out[..., t] = last
    return out


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    if rank_world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def whiten_advantages(adv: torch.Tensor, mask: torch.Tensor, mode: str, window: int) -> torch.Tensor:
    """``(A - mean) / sqrt(var + 1e-8)`` with mean and (biased) variance over ``mode``'s positions (module
    docstring); ``adv`` is read at masked positions only, every other position of the window counts as 0."""
    if mode == "none":
        return adv
    n = mask.sum()
    count = torch.as_tensor(float(adv.shape[0] * window) if mode == "window" else 0.0, dtype=adv.dtype,
                            device=adv.device)
    count = torch.maximum(count, n)        # a response longer than the window still counts its own tokens
    s = _all_sum(torch.stack([(adv * mask).sum(), count]))
    s[1] = s[1].clamp(min=1)
    mean = s[0] / s[1]
    sum_sq = (((adv - mean) ** 2) * mask).sum() + (count - n) * mean ** 2
    var = _all_sum(sum_sq) / s[1]
    return (adv - mean) * torch.rsqrt(var + 1e-8)


def policy_gradient_rkl(student_logits, teacher_logits, targets, mask, old_logprobs=None, *, alpha: float = 0.2,
                        clip: float = 0.2, gamma: float = 0.95, length_norm: bool = True, whiten: str = "window",
                        window: int | None = None, single_step: bool = True, reward_scaling: float | None = 0.5,
                        cliprange_reward: float | None = 100.0, temperature: float = 1.0) -> torch.Tensor:
    """MiniLLM's ``L_pg + L_reg`` (module docstring) on ``[B, T, V]`` logits, targets and mask ``[B, T]``.

    ``old_logprobs`` ``[B, T]``: the behaviour student's log q_old(y_t) (``None``: the current student's, detached).
    ``window``: the response window of ``whiten="window"`` (default: ``T``).
    """
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])   # vocabularies may differ by padding rows
    mask = mask.to(student_logits.dtype if student_logits.dtype == torch.float64 else torch.float32)
    logq = token_logprobs(student_logits, targets, v, temperature) * mask
    with torch.no_grad():
        logp = token_logprobs(teacher_logits, targets, v, temperature).to(logq.dtype) * mask
        old = (logq.detach() if old_logprobs is None else old_logprobs.to(logq.dtype)) * mask
        if alpha > 0:   # log((1 - alpha) q_old + alpha p)
            log_mix = torch.logaddexp(old + math.log1p(-alpha), logp + math.log(alpha))
        else:
            log_mix = old
        w = torch.exp(old - log_mix)
        rewards = logp - old
        if reward_scaling is not None:
            rewards = rewards / reward_scaling
        if cliprange_reward:
            rewards = rewards.clamp(-cliprange_reward, cliprange_reward)
        rewards = rewards * mask
        adv = discounted_returns(rewards, gamma)
        if length_norm:
            remaining = torch.flip(torch.cumsum(torch.flip(mask, [-1]), -1), [-1])   # n_t = sum_{s >= t} m_s
            adv = adv / remaining.clamp(min=1)
        adv = whiten_advantages(adv, mask, whiten, window or mask.shape[-1])
    n = mask.sum().clamp(min=1)
    ratio = torch.exp(logq - old) * w
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = (torch.max(pg1, pg2) * mask).sum() / n
    if single_step:
        sel = mask.bool()
        rkl = per_token_divergence("rkl", student_logits[..., :v][sel], teacher_logits[..., :v][sel],
                                   temperature=temperature)
        loss = loss + rkl.sum() / n
    return loss


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class PolicyGradientTerm(Term):
    """MiniLLM's ``pg_rkl`` on the sampled sequences (formula and reference lines: module docstring)."""

    needs_teacher = True
    whole_logits = True   # the returns R_t run over each sequence

    def __init__(self, *, alpha: float | None = None, clip: float = 0.2, gamma: float = 0.95, length_norm: bool = True,
                 whiten: str = "window", window: int | None = None, single_step: bool = True,
                 reward_scaling: float | None = 0.5, cliprange_reward: float | None = 100.0,
                 temperature: float = 1.0):
        super().__init__()
        self.alpha, self.clip, self.gamma, self.length_norm = alpha, clip, gamma, length_norm
        self.whiten, self.window, self.single_step = whiten, window, single_step
        self.reward_scaling, self.cliprange_reward, self.temperature = reward_scaling, cliprange_reward, temperature

    @classmethod
    def needs_fields(cls, params: dict) -> dict[str, tuple[bool, dict]]:
        return {"mix_alpha": (params.get("alpha") is None, {}),
                "old_logprobs": (False, {"temperature": float(params.get("temperature", 1.0))})}

    @classmethod
    def check_params(cls, params: dict, where: str) -> None:
        moved = [k for k in ("ppo_epochs", "num_rollouts") if k in params]
        if moved:
            raise ConfigError(f"{where}: {', '.join(moved)} belong to the rollout policy now (the PPO schedule is "
                              f"where the sequences come from): write policy: {{name: rollout, "
                              + ", ".join(f"{k}: {params[k]}" for k in moved) + "} and drop them from the term")
        super().check_params(params, where)
        d = {**cls.param_names(), **params}

        def bad(msg: str) -> ConfigError:
            return ConfigError(f"{where}: {msg}")

        if d["alpha"] is not None and not (_number(d["alpha"]) and 0 <= d["alpha"] < 1):
            raise bad("alpha must be in [0, 1) or null (the policy's mixture share, mix_alpha)")
        if not (_number(d["clip"]) and 0 <= d["clip"] < 1):
            raise bad(f"clip must be in [0, 1), got {d['clip']!r}")
        if not (_number(d["gamma"]) and 0 <= d["gamma"] <= 1):
            raise bad(f"gamma must be in [0, 1], got {d['gamma']!r}")
        for k in ("length_norm", "single_step"):
            if not isinstance(d[k], bool):
                raise bad(f"{k} must be true or false, got {d[k]!r}")
        if d["whiten"] not in WHITEN:
            raise bad(f"whiten must be one of {', '.join(WHITEN)}, got {d['whiten']!r}")
        if d["window"] is not None and (isinstance(d["window"], bool) or not isinstance(d["window"], int)
                                        or d["window"] < 1):
            raise bad(f"window must be a positive integer or null (the sampling's max_new_tokens), got {d['window']!r}")
        if d["reward_scaling"] is not None and not (_number(d["reward_scaling"]) and d["reward_scaling"] > 0):
            raise bad(f"reward_scaling must be > 0 or null (none), got {d['reward_scaling']!r}")
        if d["cliprange_reward"] is not None and not (_number(d["cliprange_reward"]) and d["cliprange_reward"] >= 0):
            raise bad(f"cliprange_reward must be >= 0 or null (0/null: no clipping), got {d['cliprange_reward']!r}")
        if not (_number(d["temperature"]) and d["temperature"] > 0):
            raise bad(f"temperature must be > 0, got {d['temperature']!r}")

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        alpha = self.alpha if self.alpha is not None else inputs.fields["mix_alpha"]
        targets, mask = inputs.targets
        old = inputs.sequences.get("old_logprobs")
        window = self.window or (inputs.sampling.max_new_tokens if inputs.sampling is not None else None)
        return policy_gradient_rkl(inputs.student_logits, inputs.teacher_logits, targets, mask,
                                   None if old is None else old[:, 1:], alpha=alpha, clip=self.clip,
                                   gamma=self.gamma, length_norm=self.length_norm, whiten=self.whiten,
                                   window=window, single_step=self.single_step, reward_scaling=self.reward_scaling,
                                   cliprange_reward=self.cliprange_reward, temperature=self.temperature)
