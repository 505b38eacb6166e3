"""A training objective: a weighted list of registered terms, ``L = sum_i weight_i * term_i``.

A recipe writes it as a list (as DistillKit's config does)::

    objective:
      - {term: sft, weight: 0.5}
      - {term: fkl, weight: 0.5, temperature: 1.0}

Each entry names a term of :data:`TERMS` and its parameters; ``name:`` tells apart two entries of one term (the
default name is the term). Entries of weight 0 are left out. Each term's masked mean is weighted by its share of the
global token count of its token set (``gold``, ``sequences``, ``positions``: every non-padding position of the
sequences, or ``batch``: one unit per micro-batch), so micro-batches and processes add up to the same objective as
one big batch; the trainer does that weighting and knows no term by name. An entry's ``balance_with: NAME``
rescales its value to entry NAME's each micro-batch (``balance.py``, ModelOpt's balancer).

A new loss is a :class:`~lmdistill.losses.term.Term` subclass in its own file plus one line in :data:`TERMS`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lmdistill.errors import ConfigError
from lmdistill.io import atomic_open
from lmdistill.losses.balance import balanced
from lmdistill.losses.corpus_lm import CorpusLMTerm
from lmdistill.losses.dac_kl import DACKLTerm
from lmdistill.losses.divergences import DIVERGENCE_PARAMS
from lmdistill.losses.hidden_states import HiddenCosineTerm, HiddenMSETerm
from lmdistill.losses.model_logits import logit_transform
from lmdistill.losses.opd import OPDTerm
from lmdistill.losses.policy_gradient import PolicyGradientTerm
from lmdistill.losses.span_correlation import SpanTerm
from lmdistill.losses.term import Term, TermContext, TermInputs
from lmdistill.losses.terms import SequenceSFTTerm, SFTTerm, divergence_term
from lmdistill.losses.uld import GOLDTerm, ULDTerm

#: Every term a recipe can list.
TERMS: dict[str, type[Term]] = {
    "sft": SFTTerm,
    "seq_sft": SequenceSFTTerm,
    **{name: divergence_term(name) for name in DIVERGENCE_PARAMS},   # fkl rkl jsd tvd skl srkl symkl
    "dac_kl": DACKLTerm,
    "pg_rkl": PolicyGradientTerm,
    "span": SpanTerm,
    "corpus_lm": CorpusLMTerm,
    "hidden_cosine": HiddenCosineTerm,
    "hidden_mse": HiddenMSETerm,
    "opd": OPDTerm,
    "uld": ULDTerm,
    "gold": GOLDTerm,
}

#: ``balance_with: NAME``: the entry's value rescaled to entry NAME's each micro-batch (``losses/balance.py``)
ENTRY_KEYS = ("term", "weight", "name", "balance_with")


def check_entry(entry, where: str) -> dict:
    """One objective entry, validated: ``{term, weight, [name], **params}`` (a new dict)."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each entry is a mapping like {{term: fkl, weight: 1.0}}, got {entry!r}")
    term = entry.get("term")
    if term not in TERMS:
        raise ConfigError(f"{where}: unknown term {term!r}; valid: {', '.join(TERMS)}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"{where}: weight must be a finite number >= 0, got {weight!r}")
    name = entry.get("name", term)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: name must be a non-empty string, got {name!r}")
    params = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    TERMS[term].check_params(params, f"{where} ({term})")
    ref = entry.get("balance_with")
    if ref is not None and (not isinstance(ref, str) or not ref):
        raise ConfigError(f"{where}: balance_with must name another entry of the objective, got {ref!r}")
    return {"term": term, "weight": float(weight), **({"name": name} if name != term else {}),
            **({"balance_with": ref} if ref else {}), **params}


def check_objective(entries, where: str = "objective") -> list[dict]:
    """The recipe's ``objective`` list, validated; names must be distinct and some weight positive."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: must be a non-empty list of terms, e.g. [{{term: sft, weight: 1.0}}]")
    out = [check_entry(e, f"{where}[{i}]") for i, e in enumerate(entries)]
    names = [entry_name(e) for e in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: two entries are named {dup[0]!r}; give one a distinct `name:`")
    if not any(e["weight"] > 0 for e in out):
        raise ConfigError(f"{where}: every weight is 0; nothing would train")
    check_balance(out, where)
    return out


def check_balance(entries: list[dict], where: str) -> None:
    """Each ``balance_with`` names another entry of positive weight that is not balanced itself."""
    live = {entry_name(e): e for e in entries if e["weight"] > 0}
    for e in entries:
        ref = e.get("balance_with")
        if ref is None or e["weight"] <= 0:
            continue
        if ref == entry_name(e) or ref not in live or live[ref].get("balance_with"):
            raise ConfigError(f"{where} ({entry_name(e)}): balance_with must name another entry of weight > 0 "
                              f"that is not balanced itself ({', '.join(n for n in live if n != entry_name(e))}), "
                              f"got {ref!r}")


def entry_name(entry: dict) -> str:
    return entry.get("name", entry["term"])


def entry_params(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in ENTRY_KEYS}


def term_class(entry: dict) -> type[Term]:
    return TERMS[entry["term"]]


def reads_teacher(entry: dict) -> bool:
    """Whether this (checked) objective entry reads the teacher."""
    return term_class(entry).reads_teacher(entry_params(entry))


class Objective(nn.Module):
    """The built terms of a (checked) objective list, with their weights; owns the terms' parameters."""

    def __init__(self, entries: list[dict], context: TermContext | None = None):
        super().__init__()
        kept = [e for e in entries if e["weight"] > 0]
        self.names = [entry_name(e) for e in kept]
        self.weights = {entry_name(e): e["weight"] for e in kept}
        self.terms = nn.ModuleList([term_class(e)(**entry_params(e)) for e in kept])
        self.balance = {entry_name(e): e["balance_with"] for e in kept if e.get("balance_with")}
        self.unbalanced: dict[str, tuple[torch.Tensor, str]] = {}   # the last forward's balanced entries, as computed
        self.stats: dict[str, tuple[float, str]] = {}   # the last forward's ENTRY/name -> (Term.last_stats, token set)
        if context is not None:   # the run's models: terms size their parameters from them (Term.bind)
            for term in self.terms:
                term.bind(context)

    @property
    def token_sets(self) -> set[str]:
        return {t.tokens for t in self.terms}

    def whole_logits(self, student=None, *teachers) -> bool:
        """Whether micro-batches need ``[B, T, V]`` logits: a term reads sequence structure, or a local model's logit
        post-processing is unknown (:mod:`.model_logits`: only its full forward applies it). Known post-processing
        (Gemma's soft-cap, Cohere's scale) is applied at the selected positions, so it needs no full forward."""
        local = [m for m in (student, *teachers) if m is not None]   # models in this process (``Teacher.models()``)
        return any(t.whole_logits for t in self.terms) or any(logit_transform(m) is None for m in local)

    def forward(self, inputs: TermInputs, chunked: bool = False) -> dict[str, tuple[torch.Tensor, str]]:
        """``name -> (masked mean, token set)`` of every term on one micro-batch; entries with ``balance_with``
        rescaled to their reference's value (``losses/balance.py``)."""
        reads = [t.layers_read() for t in self.terms]
        inputs.want_layers([n for s, _ in reads for n in s], [n for _, t in reads for n in t])
        # terms reading layer outputs go last: the logit terms' forwards record them (one forward per model)
        order = sorted(range(len(self.terms)), key=lambda i: reads[i] != ((), ()))
        values = {}
        for i in order:
            term = self.terms[i]
            term.last_stats = {}   # what this forward measures besides its value (Term.last_stats)
            values[self.names[i]] = (term.chunked(inputs) if chunked else term(inputs), term.tokens)
        self.stats = {f"{self.names[i]}/{k}": (float(v), self.terms[i].tokens)
                      for i in order for k, v in self.terms[i].last_stats.items()}
        self.unbalanced = {name: (values[name][0].detach(), values[name][1]) for name in self.balance}
        for name, ref in self.balance.items():
            values[name] = (balanced(values[name][0], values[ref][0]), values[name][1])
        return {name: values[name] for name in self.names}

    def artifacts(self) -> dict[str, tuple[dict, dict]]:
        """Every term's files to write beside the run (``Term.artifacts``), keys prefixed with the entry's name."""
        out: dict[str, tuple[dict, dict]] = {}
        for name, term in zip(self.names, self.terms):
            for file, (tensors, meta) in term.artifacts().items():
                t, m = out.setdefault(file, ({}, {}))
                t.update({f"{name}.{k}": v for k, v in tensors.items()})
                m.update({f"{name}.{k}": v for k, v in meta.items()})
        return out

    def write_artifacts(self, folder) -> list[Path]:
        """Write :meth:`artifacts` into ``folder`` (safetensors, atomically); the paths written."""
        paths = []
        for file, (tensors, meta) in self.artifacts().items():
            with atomic_open(Path(folder) / file, "wb") as f:
                f.write(safetensors_bytes(tensors, metadata=meta))
            paths.append(Path(folder) / file)
        return paths
