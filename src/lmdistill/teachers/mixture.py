"""A weighted mixture of same-tokenizer teachers: every row is read by all of them at once (``teacher_mix``).

This is ours, not a peer's: the tools that take several teachers route each row to one (``routed.py``); slime's open
MOPD pull request (THUDM/slime#2051) averages per-teacher advantages, which is another thing. With members ``i`` of
weights ``w_i`` (normalised to sum to 1) and full next-token distributions ``p_i = softmax(z_i)``, the mixture's
distribution at each position is

    p_mix = sum_i w_i * p_i,     logits(p_mix) = log p_mix = logsumexp_i(log w_i + log_softmax(z_i))

(each member's softmax over its own vocabulary, then cut to the smallest member's). The log-probabilities are
returned as the mixture's logits, so every term reads it as it reads one teacher; a term's temperature ``T`` then
applies to the mixture, ``softmax(log p_mix / T)`` (``p_mix^(1/T)`` renormalised), not to each member before mixing.

Every member must give its full distribution (``logits``): top-k scores (a cache, a server) cannot be averaged
exactly, and another tokenizer's distribution is over other tokens (the run checks each member's tokenizer against
the student's, as for one teacher). The mixture gives logits only: no hidden states (the chunked loss needs one LM
head) and no next-token steps.
"""

from __future__ import annotations

import math

import torch

from lmdistill.errors import ConfigError
from lmdistill.teachers.base import Capabilities, Teacher


class MixedTeacher(Teacher):
    """``members`` by name, read together with ``weights`` (module docstring)."""

    kind = "mixture"

    def __init__(self, members: dict[str, Teacher], weights: dict[str, float]):
        if set(members) != set(weights) or not members:
            raise ConfigError(f"teacher_mix: weights for {sorted(weights)} but teachers {sorted(members)}")
        for name, member in members.items():
            if not member.capabilities.logits:
                raise ConfigError(f"teacher_mix: teachers.{name} (a {member.kind} teacher) does not give its full "
                                  "next-token distribution; a mixture averages full distributions of teachers that "
                                  "share the student's tokenizer (models in this process)")
        total = sum(float(w) for w in weights.values())
        self.members = dict(members)
        self.weights = {name: float(weights[name]) / total for name in members}
        self.capabilities = Capabilities(logits=True,
                                         new_sequences=all(m.capabilities.new_sequences for m in members.values()))
        self.vocab = min((m.vocab for m in members.values() if m.vocab), default=None)

    @torch.no_grad()
    def logits(self, batch: dict, mask, whole: bool) -> torch.Tensor:
        """``log p_mix`` ``[B, T-1, V]`` or ``[N, V]``, in float32 (float64 when the members' logits are)."""
        parts = [(w, self.members[name].logits(batch, mask, whole)) for name, w in self.weights.items()]
        vocab = min(z.shape[-1] for _, z in parts)
        dtype = torch.float64 if any(z.dtype == torch.float64 for _, z in parts) else torch.float32
        logs = [math.log(w) + torch.log_softmax(z.to(dtype), -1)[..., :vocab] for w, z in parts]
        return torch.stack(logs).logsumexp(0)

    def models(self) -> list:
        return [model for m in self.members.values() for model in m.models()]

    def close(self) -> None:
        for member in self.members.values():
            member.close()
