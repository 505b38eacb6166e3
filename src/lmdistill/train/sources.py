"""The registry of sequence sources: a recipe's ``policy`` -> the class that builds its training sequences.

``gold`` and ``replay`` (``sequences.py``) and ``rollout`` (``rollout.py``) are sources of their own; every other
policy is one engine policy, sampled by :class:`~lmdistill.train.sequences.GeneratedSequences`.
"""

from __future__ import annotations

from lmdistill.train.rollout import RolloutSequences
from lmdistill.train.sequences import GeneratedSequences, GoldSequences, ReplaySequences

#: Sources that are not one engine policy.
SOURCES = {"gold": GoldSequences, "replay": ReplaySequences, "rollout": RolloutSequences}


def source_class(policy: str) -> type[GoldSequences]:
    return SOURCES.get(policy, GeneratedSequences)


def make_sequence_source(cfg):
    return source_class(cfg.policy)(cfg)
