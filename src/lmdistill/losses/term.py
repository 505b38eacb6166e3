"""What one term of a training objective is, and what it may ask of a micro-batch.

A term is a small ``nn.Module`` (so it can own parameters and state, as DAC-KL's sub-network does). It declares:

- ``tokens``: the token set its masked mean runs over, ``"gold"`` (the dataset's responses) or ``"sequences"`` (the
  policy's distilled sequences); the trainer weights the term by its share of that set's global token count.
  ``"batch"``: the term brings its own data (``corpus_lm``); each micro-batch's mean counts once;
  ``"positions"``: every non-padding position of the sequences, prompt included (hidden-state terms, ``all``);
- ``needs_teacher``: it reads teacher logits or hidden states;
- ``whole_logits``: it needs ``[B, T, V]`` logits (sequence structure: returns, span pairs) instead of logits at
  trained positions only;
- ``chunkable``: it has a ``chunked(inputs)`` form over hidden states + LM head (real 100k+ vocabularies);
- ``sparse_teacher``: it also works from the teacher's top-k log-probabilities (a cached or served teacher,
  ``inputs.teacher_top_k``) instead of its logits.

What it asks of the teacher (``teacher_needs``: the teacher capabilities any one of which will do, and the
temperature) and of the policy's batches (``needs_fields``: e.g. MiniLLM's ``old_logprobs``) is checked against the
teacher kind and the policy before anything loads (``train/config.py``). ``inputs.teacher`` is a
:class:`lmdistill.teachers.base.Teacher`: terms call its methods through ``TermInputs``, never its class.

``forward(inputs)`` returns the term's masked mean. ``inputs`` is a :class:`TermInputs`: it computes each forward at
most once per micro-batch, on first use, so terms that share logits share the forward.

Parameters of a term come from its recipe entry; ``check_params`` validates them without building the module.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

import torch
from torch import nn

from lmdistill.errors import ConfigError
from lmdistill.losses.model_forward import forward_hidden, forward_logits, head_transform, selected_logits, shifted
from lmdistill.losses.layer_states import recorded_forward, recording
from lmdistill.losses.model_logits import LogitTransform


class Term(nn.Module):
    """Base class of objective terms; subclasses set the class attributes and ``forward``."""

    tokens: str = "sequences"
    needs_teacher: bool = False
    whole_logits: bool = False
    chunkable: bool = False
    sparse_teacher: bool = False
    #: What the last ``forward`` measured besides its value (``{name: float}``, e.g. ``uld``'s alignment coverage):
    #: the objective clears it before each forward and the trainer logs it as ``ENTRY/name``, a mean over the step's
    #: micro-batches and processes weighted by the term's tokens (as its loss). A term sets a new dict, never mutates.
    last_stats: Mapping[str, float] = MappingProxyType({})

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

    @classmethod
    def teacher_needs(cls, params: dict) -> tuple[tuple[str, ...], float | None]:
        """``(capabilities any one of which will do, temperature)`` this entry asks of the teacher; ``((), None)``
        when it does not read the teacher."""
        if not cls.reads_teacher(params):
            return (), None
        return (("logits", "top_k") if cls.sparse_teacher else ("logits",)), float(params.get("temperature", 1.0))

    @classmethod
    def needs_fields(cls, params: dict) -> dict[str, tuple[bool, dict]]:
        """Fields this entry reads in the policy's batches beside the tokens (``old_logprobs``: the behaviour
        policy's log-probabilities): ``name -> (required, properties)``; where the policy provides one, its
        properties must equal these (``train/needs.py``)."""
        return {}

    @classmethod
    def check_sequences(cls, params: dict, policy: str, sampling, where: str) -> None:
        """Refuse (``ConfigError``) a policy (its name) or a ``SamplingConfig`` whose sequences this entry cannot train
        on, e.g. an on-policy estimator on sequences the student did not sample (default: any will do)."""

    def chunked(self, inputs: "TermInputs") -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no chunked form")

    def bind(self, context: "TermContext") -> None:
        """Called once the run's models are loaded, before the optimiser is made: a term that sizes parameters from
        the models or reads the student's folder (the hidden-state terms' layer map and projection) does it here."""

    def layers_read(self) -> tuple[tuple, tuple]:
        """The layer outputs this term reads, ``(student layers, teacher layers)`` (:mod:`.layer_states`): the
        objective asks ``TermInputs.want_layers`` for them before any forward, so the forwards record them."""
        return (), ()

    def artifacts(self) -> dict[str, tuple[dict, dict]]:
        """Files this term writes beside the run at export, never inside the model folder: ``file name ->
        (tensors, metadata)`` (the hidden-state projection)."""
        return {}


@dataclass
class TermContext:
    """What ``Term.bind`` may read of the run: the student model, the teacher (a ``Teacher`` or ``None``) and the
    student's folder or hub id."""

    student: object
    teacher: object = None
    student_path: str = ""


@dataclass
class TermInputs:
    """One micro-batch, as the terms see it.

    ``gold`` and ``sequences`` are right-padded training batches (``input_ids``, ``attention_mask``, ``loss_mask``);
    ``same`` says they are the same batch (one student forward serves both); ``teacher`` is a
    :class:`~lmdistill.teachers.base.Teacher` (or ``None``). ``whole`` selects ``[B, T-1, V]``
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
    fields: dict = field(default_factory=dict)   # per-batch values of the policy (``mix_alpha``)
    layers: dict = field(default_factory=dict)   # "student"/"teacher" -> layer outputs the terms read (want_layers)
    recorded: dict = field(default_factory=dict)   # "student"/"teacher" -> {layer: output} on the sequences

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
        if tokens == "positions":   # every non-padding position of the sequences (hidden-state terms, prompt too)
            return self.sequences["attention_mask"].sum()
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
        with self._recording(batch):
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
        return not self.teacher.capabilities.logits

    @cached_property
    def teacher_top_k(self):
        """The teacher's :class:`~lmdistill.losses.sparse.SparseTeacher` at the sequences' trained positions
        (row-major, the order of ``flat``)."""
        return self.teacher.top_k(self.rows, self.sequences)

    @cached_property
    def teacher_aligned(self):
        """A teacher with another tokenizer on the sequences: its distributions on its own tokens of their text,
        grouped with the student's tokens by bytes (an :class:`~lmdistill.losses.aligned.AlignedTeacher`)."""
        return self.teacher.aligned(self.rows, self.sequences)

    @cached_property
    def teacher_token_logprobs(self) -> torch.Tensor:
        """``[N]`` float32: the teacher's log-probability of each trained token of the sequences, row-major (the
        order of ``flat``); a gather of ``teacher_logits`` (shared with other terms) when the teacher gives logits,
        else asked of it alone (a server sends one score per token, no top-k)."""
        targets, mask = self.targets
        if not self.teacher.capabilities.logits:
            return self.teacher.token_logprobs(self.rows, self.sequences).to(targets.device)
        logits = self.teacher_logits if not self.whole else self.teacher_logits[mask.bool()]
        lp = torch.log_softmax(logits.float(), -1)
        return lp.gather(-1, targets[mask.bool()][:, None])[:, 0]

    @cached_property
    def teacher_logits(self) -> torch.Tensor:
        s = self.student_logits
        with self._teacher_recording():
            return self.teacher.logits(self.sequences, self.targets[1], self.whole).to(s.dtype)

    # --------------------------------------------------------------- hidden states (chunked terms)
    # A chunked term computes logits as ``transform(hidden @ weight.T)`` chunk by chunk, ``transform`` being what
    # the model's forward applies after its LM head (:mod:`.model_logits`; a model where that is unknown is refused).
    @cached_property
    def student_transform(self) -> LogitTransform:
        return head_transform(self.student)

    @cached_property
    def teacher_transform(self) -> LogitTransform:
        return self.teacher.transform

    @cached_property
    def gold_hidden(self) -> tuple[torch.Tensor, torch.Tensor]:
        with self._recording(self.gold):
            return forward_hidden(self.student, self.gold)

    @cached_property
    def student_hidden(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.same:
            return self.gold_hidden
        with self._recording(self.sequences):
            return forward_hidden(self.student, self.sequences)

    @cached_property
    def teacher_hidden(self) -> tuple[torch.Tensor, torch.Tensor]:
        with self._teacher_recording():
            return self.teacher.hidden(self.sequences)

    # --------------------------------------------------------------- layer outputs (hidden-state terms)
    # The objective names the layers its terms read before any forward (``want_layers``); the student's and the
    # teacher's forwards of the sequences above then record them (:mod:`.layer_states`): no forward of their own.
    def want_layers(self, student=(), teacher=()) -> None:
        """Record these layer outputs in every later forward of the sequences (once per model)."""
        for side, names in (("student", student), ("teacher", teacher)):
            self.layers[side] = tuple(dict.fromkeys((*self.layers.get(side, ()), *names)))

    @contextmanager
    def _keep(self, side: str, context):
        with context as caught:
            yield
        self.recorded[side] = dict(caught)

    def _recording(self, batch: dict):
        """The context a student forward of ``batch`` runs in: it records the wanted layers on the sequences."""
        names = self.layers.get("student")
        if not names or "student" in self.recorded or not (batch is self.sequences or self.same):
            return nullcontext()
        return self._keep("student", recording(self.student, names))

    def _teacher_recording(self):
        names = self.layers.get("teacher")
        if not names or "teacher" in self.recorded:
            return nullcontext()
        return self._keep("teacher", self.teacher.record_layers(names))

    def _states(self, side: str, layers, run) -> list[torch.Tensor]:
        got = self.recorded.setdefault(side, {})
        missing = [n for n in dict.fromkeys(layers) if n not in got]
        if missing:
            got.update(run(missing))
        return [got[n] for n in layers]

    def student_layer_states(self, layers) -> list[torch.Tensor]:
        """The student's outputs ``[B, T, H]`` at ``layers`` on the sequences, with their gradients: recorded by
        the logit terms' forward, or from a forward of their own when no term computed logits before."""
        return self._states("student", layers, lambda missing: recorded_forward(self.student, self.sequences, missing))

    def teacher_layer_states(self, layers) -> list[torch.Tensor]:
        """The teacher's outputs ``[B, T, H]`` at ``layers`` on the sequences (``Teacher.layer_states``)."""
        return self._states("teacher", layers,
                            lambda missing: dict(zip(missing, self.teacher.layer_states(self.sequences, missing))))
