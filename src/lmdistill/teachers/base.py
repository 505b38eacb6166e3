"""The teacher, as distillation sees it: what a teacher of each kind can give, and one check of what a run asks.

A teacher kind is one :class:`Teacher` subclass (``local.py``: a model in this process; ``cache.py``: top-k scores
captured offline; ``served.py``: an OpenAI-compatible server) listed in ``open.py``'s ``KINDS``. Each declares its
:class:`Capabilities`; everything else asks the teacher through the methods below and reads the capabilities, never
its class. What a run asks of its teacher comes from the policy (``Policy.teacher_needs``: next-token ``steps``
while generating, or whole-``sequence_scores``) and from the objective's terms (``Term.teacher_needs``: the
teacher's full ``logits`` or its ``top_k``, at a temperature); :func:`check_use` compares the two, before any model
loads (``train``, ``generate``, ``capture``) and again when a teacher opens (a cache knows its temperature then).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmdistill.errors import ConfigError

#: What each capability means, for messages.
MEANING = {
    "logits": "its full next-token distribution at every position",
    "hidden_states": "its hidden states",
    "top_k": "its top-k log-probabilities of given sequences",
    "sequence_scores": "scores of whole written sequences",
    "steps": "its next-token distribution at every generated step",
    "token_logprobs": "its log-probability of each token of given sequences",
    "aligned": "its full distributions on its own tokens of the text, aligned to the student's by bytes "
               "(teacher=xtok:PATH)",
    "aligned_top_k": "its top-k on its own tokens of the text, aligned to the student's by bytes "
                     "(teacher=xtok:openai:NAME@URL or xtok:cache:DIR)",
}


@dataclass(frozen=True)
class Capabilities:
    """What a teacher can give (``MEANING``); ``new_sequences``: it scores sequences made during training (a cache
    holds only the rows it captured); ``temperatures``: the temperatures its scores can be at (``None``: any)."""

    logits: bool = False
    hidden_states: bool = False
    top_k: bool = False
    sequence_scores: bool = False
    steps: bool = False
    token_logprobs: bool = False
    aligned: bool = False
    aligned_top_k: bool = False
    new_sequences: bool = True
    temperatures: tuple[float, ...] | None = None

    def has(self, name: str) -> bool:
        return bool(getattr(self, name))


@dataclass(frozen=True)
class Need:
    """One thing a run asks of its teacher: ``any_of`` capabilities (one suffices), at ``temperature`` (``None``:
    none in particular), on sequences made during training (``new_sequences``); ``who`` asks (for messages)."""

    who: str
    any_of: tuple[str, ...]
    temperature: float | None = None
    new_sequences: bool = False


def unmet(kind: str, caps: Capabilities, needs: list[Need]) -> list[str]:
    """What of ``needs`` a teacher of ``kind`` with ``caps`` cannot give, one sentence each."""
    out = []
    for need in needs:
        if need.any_of and not any(caps.has(c) for c in need.any_of):
            wants = " or ".join(MEANING[c] for c in need.any_of)
            gives = [MEANING[c] for c in MEANING if caps.has(c)]
            out.append(f"{need.who} needs {wants}; a {kind} teacher gives {', '.join(gives) or 'nothing of that'}")
        elif need.new_sequences and not caps.new_sequences:
            out.append(f"{need.who} reads the teacher on sequences made during training; a {kind} teacher holds "
                       "only the sequences it was captured on (generate them first with `lmdistill generate`, capture "
                       "that file, train on it)")
        elif need.temperature is not None and caps.temperatures is not None and \
                float(need.temperature) not in caps.temperatures:
            out.append(f"{need.who} uses temperature {need.temperature}; a {kind} teacher's scores are at temperature "
                       f"{' or '.join(str(t) for t in caps.temperatures)}")
    return out


def check_use(kind: str, caps: Capabilities, needs: list[Need], where: str) -> None:
    """``ConfigError`` listing everything ``needs`` asks that a ``kind`` teacher with ``caps`` cannot give."""
    problems = unmet(kind, caps, needs)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


class Teacher:
    """A teacher of some kind. Subclasses set ``kind`` and ``capabilities`` and implement what those promise:

    - ``logits(batch, mask, whole)``: ``[B, T-1, V]`` (``whole``) or ``[N, V]`` at ``mask``'s trained positions,
      the model's own logits (``losses.model_forward``);
    - ``hidden(batch)``: final hidden states and LM-head weight (chunked losses), with ``transform`` (what its
      forward applies after the head);
    - ``top_k(rows, batch)``: a :class:`~lmdistill.losses.sparse.SparseTeacher` at the batch's trained positions;
    - ``sequence_scores(sequences, wanted)``: the same for given token lists and positions;
    - ``token_logprobs(rows, batch)``: ``[N]`` log-probabilities of the batch's own tokens at its trained positions
      (row-major), nothing else (on-policy distillation, ``losses/opd.py``);
    - ``aligned(rows, batch)``: an :class:`~lmdistill.losses.aligned.AlignedTeacher`, its distributions on its own
      tokens of the batch's text, grouped with the student's tokens by byte offsets (``cross_tokenizer.py``);
    - ``layer_shape()``, ``layer_states(batch, layers)``, ``record_layers(layers)``: its blocks and width, the
      outputs of its layers (``embed``, a block index, ``final``: ``losses/layer_states.py``) on a batch, or
      recorded during its other forwards (hidden-state terms, capability ``hidden_states``);
    - ``model``: the ``nn.Module`` itself, for the capabilities that run it step by step (``steps``).

    ``vocab`` is its vocabulary size when known, ``tokenizer`` its tokenizer when it has one here.
    """

    kind: ClassVar[str] = ""
    #: the ``teacher:`` values of this kind start with it (``""``: the default kind, a model folder or hub id)
    prefix: ClassVar[str] = ""
    capabilities: Capabilities = Capabilities()
    model = None
    tokenizer = None
    vocab: int | None = None

    @classmethod
    def check_spec_text(cls, spec: str) -> None:
        """Refuse a malformed ``teacher:`` value of this kind with a ``ConfigError`` showing the right form."""

    @classmethod
    def spec_capabilities(cls, spec: str) -> Capabilities:
        """What a teacher of this kind named by ``spec`` can give, before it opens (default: the kind's)."""
        return cls.capabilities

    def _cannot(self, what: str):
        return ConfigError(f"a {self.kind} teacher cannot give {what}")

    def logits(self, batch: dict, mask, whole: bool):
        raise self._cannot(MEANING["logits"])

    def hidden(self, batch: dict):
        raise self._cannot(MEANING["hidden_states"])

    @property
    def transform(self):
        raise self._cannot(MEANING["hidden_states"])

    def top_k(self, rows, batch: dict):
        raise self._cannot(MEANING["top_k"])

    def sequence_scores(self, sequences: list[list[int]], wanted: list[list[int]]):
        raise self._cannot(MEANING["sequence_scores"])

    def token_logprobs(self, rows, batch: dict):
        raise self._cannot(MEANING["token_logprobs"])

    def aligned(self, rows, batch: dict):
        raise self._cannot(MEANING["aligned"])

    def layer_shape(self) -> tuple[int, int]:
        raise self._cannot(MEANING["hidden_states"])

    def layer_states(self, batch: dict, layers) -> list:
        raise self._cannot(MEANING["hidden_states"])

    def record_layers(self, layers):
        raise self._cannot(MEANING["hidden_states"])

    #: the teachers it routes rows to, by name (several teachers: ``routed.py``); ``()``: it reads every row itself
    names: tuple[str, ...] = ()

    def route(self, rows) -> list[str] | None:
        """The name of the teacher that reads each of ``rows`` (``None``: this teacher reads them all itself)."""
        return None

    def given(self, rows) -> "Teacher":
        """The teacher that reads ``rows``: itself, or, for a routed teacher whose rows all name one member, that
        member (the trainer asks it per micro-batch)."""
        return self

    def models(self) -> list:
        """The ``nn.Module``s it runs in this process (the parallelism strategy shards and releases each)."""
        return [] if self.model is None else [self.model]

    def check(self, needs: list[Need], where: str = "teacher") -> None:
        """:func:`check_use` with this teacher's own capabilities (a cache's temperature is known once it opens)."""
        check_use(self.kind, self.capabilities, needs, where)

    def close(self) -> None:
        pass
