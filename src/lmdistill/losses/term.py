"""What one term of a training objective is, and what it may ask of a micro-batch.

A term is a small ``nn.Module`` (so it can own parameters and state, as DAC-KL's sub-network does). It declares:

- ``tokens``: the token set its masked mean runs over, ``"gold"`` (the dataset's responses) or ``"sequences"`` (the
  policy's distilled sequences); the trainer weights the term by its share of that set's global token count.
  ``"batch"``: the term brings its own data (``corpus_lm``); each micro-batch's mean counts once;
- ``needs_teacher``: it reads teacher logits or hidden states;
- ``whole_logits``: it needs ``[B, T, V]`` logits (sequence structure: returns, span pairs) instead of logits at
  trained positions only;
- ``chunkable``: it has a ``chunked(inputs)`` form over hidden states + LM head (real 100k+ vocabularies);
- ``sparse_teacher``: it also works from the teacher's top-k log-probabilities (a cached or served teacher,
  ``inputs.teacher_top_k``) instead of its logits.

``forward(inputs)`` returns the term's masked mean. ``inputs`` is a :class:`TermInputs`: it computes each forward at
most once per micro-batch, on first use, so terms that share logits share the forward.

Parameters of a term come from its recipe entry; ``check_params`` validates them without building the module.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from lmdistill.errors import ConfigError
from lmdistill.losses.model_forward import forward_hidden, forward_logits, head_transform, selected_logits, shifted
from lmdistill.losses.model_logits import LogitTransform


class Term(nn.Module):
    """Base class of objective terms; subclasses set the class attributes and ``forward``."""

    tokens: str = "sequences"
    needs_teacher: bool = False
    whole_logits: bool = False
    chunkable: bool = False
    sparse_teacher: bool = False

    #: The callable whose keyword parameters are the term's recipe parameters (default: the term's ``__init__``).
    params_of = None

    @classmethod
    def param_names(cls) -> dict[str, object]:
        """The recipe parameters this term accepts, with their defaults."""
        sig = inspect.signature(cls.params_of or cls.__init__)
        return {p.name: p.default for p in list(sig.parameters.values())[1:]
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    @classmethod
    def check_params(cls, params: dict, where: str) -> None:
        """Raise ``ConfigError`` naming the valid parameters for an unknown one; subclasses add range checks."""
        allowed = cls.param_names()
        extra = sorted(set(params) - set(allowed))
        if extra:
            raise ConfigError(f"{where}: unknown parameter(s) {', '.join(extra)}; valid: {', '.join(allowed) or 'none'}")

    @classmethod
    def reads_teacher(cls, params: dict) -> bool:
        """Whether an entry with these parameters reads the teacher (default: ``needs_teacher``)."""
        return cls.needs_teacher

    def chunked(self, inputs: "TermInputs") -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no chunked form")


@dataclass
class TermInputs:
    """One micro-batch, as the terms see it.

    ``gold`` and ``sequences`` are right-padded training batches (``input_ids``, ``attention_mask``, ``loss_mask``);
    ``same`` says they are the same batch (one student forward serves both). ``whole`` selects ``[B, T-1, V]``
    logits for every term (set when any term needs them, or a model's logit post-processing is unknown); otherwise
    logits are ``[N, V]`` at the N trained positions. Either way they are each model's own logits, post-processing
    (soft-cap, scale) included. ``rows`` are the sequences' token rows (``prompt_ids``,
    ``response_ids``), ``sampling`` how they were drawn (a ``SamplingConfig``; terms that correct for the sampling
    distribution read it).
    """

    student: object
    teacher: object
    gold: dict
    sequences: dict
    same: bool
    whole: bool
    rows: list = field(default_factory=list)
    tokenizer: object = None
    sampling: object = None

    # --------------------------------------------------------------- targets and masks (positions 0..T-2)
    @cached_property
    def gold_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        return shifted(self.gold)

    @cached_property
    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        return shifted(self.sequences)

    def token_count(self, tokens: str) -> torch.Tensor:
        """The number of trained tokens of token set ``tokens`` (``gold`` or ``sequences``) in this micro-batch;
        ``batch`` counts the micro-batch itself as one unit (a term whose mean runs over its own data)."""
        if tokens == "batch":
            return torch.ones((), device=self.gold["input_ids"].device)
        return (self.gold_targets if tokens == "gold" else self.targets)[1].sum()

    def flat(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` laid out like the logits: whole, or at trained positions only."""
        return x if self.whole else x[mask.bool()]

    @property
    def logits_mask(self) -> torch.Tensor | None:
        """The mask a loss applies to the sequences' logits (``None`` when they are already selected)."""
        return self.targets[1] if self.whole else None

    # --------------------------------------------------------------- logits
    def _logits(self, model, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        return forward_logits(model, batch)[:, :-1] if self.whole else selected_logits(model, batch, mask)

    @cached_property
    def gold_logits(self) -> torch.Tensor:
        return self._logits(self.student, self.gold, self.gold_targets[1])

    @cached_property
    def student_logits(self) -> torch.Tensor:
        """The student's logits on the sequences."""
        return self.gold_logits if self.same else self._logits(self.student, self.sequences, self.targets[1])

    @property
    def teacher_is_sparse(self) -> bool:
        """The teacher gives top-k scores of sequences (a cache or a server), not logits."""
        return hasattr(self.teacher, "sparse_scores")

    @cached_property
    def teacher_top_k(self):
        """The teacher's :class:`~lmdistill.losses.sparse.SparseTeacher` at the sequences' trained positions
        (row-major, the order of ``flat``)."""
        return self.teacher.sparse_scores(self.rows, self.sequences)

    @cached_property
    def teacher_logits(self) -> torch.Tensor:
        if self.teacher_is_sparse:
            raise TypeError("this teacher gives top-k scores, not logits (a term without sparse_teacher read it)")
        s = self.student_logits
        with torch.no_grad():
            return self._logits(self.teacher, self.sequences, self.targets[1]).to(s.dtype)

    # --------------------------------------------------------------- hidden states (chunked terms)
    # A chunked term computes logits as ``transform(hidden @ weight.T)`` chunk by chunk, ``transform`` being what
    # the model's forward applies after its LM head (:mod:`.model_logits`; a model where that is unknown is refused).
    @cached_property
    def student_transform(self) -> LogitTransform:
        return head_transform(self.student)

    @cached_property
    def teacher_transform(self) -> LogitTransform:
        return head_transform(self.teacher)

    @cached_property
    def gold_hidden(self) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_hidden(self.student, self.gold)

    @cached_property
    def student_hidden(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gold_hidden if self.same else forward_hidden(self.student, self.sequences)

    @cached_property
    def teacher_hidden(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return forward_hidden(self.teacher, self.sequences)
