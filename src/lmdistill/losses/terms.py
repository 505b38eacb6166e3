"""The token-level terms: cross-entropy on gold responses or on the policy's sequences, and the divergences.

- ``sft``:     L = mean over gold response tokens of -log q(y_t)                      (tokens: gold)
- ``seq_sft``: L = mean over the policy's sequence tokens of -log q(y_t)  (SeqKD)   (tokens: sequences)
- ``fkl, rkl, jsd, tvd, skl, srkl, symkl``: L = mean over sequence tokens of D(p_t, q_t) with p = softmax(teacher / T),
  q = softmax(student / T); the formulas are in :mod:`lmdistill.losses.divergences`, the parameters (``beta``,
  ``alpha``, ``lam``) as there. With a cached or served teacher (top-k log-probabilities and a tail bucket) the same
  divergence is taken on the K + 1 bins (:mod:`lmdistill.losses.sparse`).
"""

from __future__ import annotations

import torch

from lmdistill.errors import ConfigError
from lmdistill.losses.chunked import chunked_divergence
from lmdistill.losses.divergences import DIVERGENCE_PARAMS, check_divergence_params, check_temperature
from lmdistill.losses.functional import sft_loss
from lmdistill.losses.registry import get_loss
from lmdistill.losses.sparse import sparse_divergence
from lmdistill.losses.term import Term, TermInputs


class SFTTerm(Term):
    """Cross-entropy on the dataset's gold responses: ``mean_t -log q(y_t)``."""

    tokens = "gold"
    chunkable = True

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        labels, mask = inputs.gold_targets
        return sft_loss(inputs.gold_logits, inputs.flat(labels, mask), mask if inputs.whole else None)

    def chunked(self, inputs: TermInputs) -> torch.Tensor:
        labels, mask = inputs.gold_targets
        h, w = inputs.gold_hidden
        return chunked_divergence("sft", h[:, :-1], w, labels=labels, mask=mask,
                                  student_transform=inputs.student_transform)


class SequenceSFTTerm(Term):
    """Cross-entropy on the policy's sequences (SeqKD when the policy is the teacher): ``mean_t -log q(y_t)``."""

    chunkable = True

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        targets, mask = inputs.targets
        return sft_loss(inputs.student_logits, inputs.flat(targets, mask), inputs.logits_mask)

    def chunked(self, inputs: TermInputs) -> torch.Tensor:
        targets, mask = inputs.targets
        h, w = inputs.student_hidden
        return chunked_divergence("sft", h[:, :-1], w, labels=targets, mask=mask,
                                  student_transform=inputs.student_transform)


class DivergenceTerm(Term):
    """A token-level divergence ``mean_t D(p_t, q_t)`` on the policy's sequences (formulas: ``divergences.py``).

    Built as ``DivergenceTerm(name, temperature=..., **params)``; the registry binds ``name``.
    """

    needs_teacher = True
    chunkable = True
    sparse_teacher = True
    divergence = ""

    def __init__(self, *, temperature: float = 1.0, **params):
        super().__init__()
        self.temperature = temperature
        self.params = params
        self.loss = get_loss(self.divergence, **params)

    @classmethod
    def param_names(cls) -> dict[str, object]:
        return {"temperature": 1.0, **DIVERGENCE_PARAMS.get(cls.divergence, {})}

    @classmethod
    def check_params(cls, params: dict, where: str) -> None:
        super().check_params(params, where)
        try:
            if "temperature" in params:
                check_temperature(params["temperature"])
            check_divergence_params(cls.divergence, {k: v for k, v in params.items() if k != "temperature"})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        if inputs.teacher_is_sparse:
            return sparse_divergence(self.divergence, inputs.student_logits, inputs.teacher_top_k, inputs.logits_mask,
                                     temperature=self.temperature, **self.params)
        return self.loss(inputs.student_logits, inputs.teacher_logits, inputs.logits_mask,
                         temperature=self.temperature)

    def chunked(self, inputs: TermInputs) -> torch.Tensor:
        _, mask = inputs.targets
        s_h, w = inputs.student_hidden
        if inputs.teacher_is_sparse:
            return chunked_divergence(self.divergence, s_h[:, :-1], w, teacher_sparse=inputs.teacher_top_k, mask=mask,
                                      temperature=self.temperature, student_transform=inputs.student_transform,
                                      **self.params)
        t_h, t_w = inputs.teacher_hidden
        return chunked_divergence(self.divergence, s_h[:, :-1], w, teacher_hidden=t_h[:, :-1].to(s_h.dtype),
                                  teacher_head_weight=t_w.to(w.dtype), mask=mask, temperature=self.temperature,
                                  student_transform=inputs.student_transform,
                                  teacher_transform=inputs.teacher_transform, **self.params)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in {"temperature": self.temperature, **self.params}.items())


def divergence_term(name: str) -> type[DivergenceTerm]:
    """The term class of divergence ``name`` (``fkl``, ``jsd``, ...)."""
    return type(f"{name.upper()}Term", (DivergenceTerm,), {"divergence": name, "__doc__": DivergenceTerm.__doc__})
