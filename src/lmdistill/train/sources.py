"""Every policy a recipe can name: ``policy: {name: NAME, ...its parameters}`` -> the class that builds its sequences.

``gold`` and ``replay`` (``sequences.py``) and ``rollout`` (``rollout.py``) are sources of their own; every engine
policy (``student``, ``teacher``, ``mixed``, ``switch``, ``scrg``, ``teacher_mix``: ``generation/policies``) is sampled
by its :func:`~lmdistill.train.sequences.generated` class. A new policy is one class (or one engine policy) and one
line here.
"""

from __future__ import annotations

from lmdistill.errors import ConfigError
from lmdistill.generation import POLICIES as ENGINE_POLICIES
from lmdistill.generation.policies import make_params, params_dict
from lmdistill.train.rollout import RolloutSequences
from lmdistill.train.sequences import GoldSequences, ReplaySequences, generated

#: ``name -> source class``.
POLICIES: dict[str, type[GoldSequences]] = {
    "gold": GoldSequences,
    **{name: generated(engine) for name, engine in ENGINE_POLICIES.items()},
    "replay": ReplaySequences,
    "rollout": RolloutSequences,
}


def policy_class(spec: dict) -> type[GoldSequences]:
    return POLICIES[spec["name"]]


def policy_params(spec: dict):
    """The parameters of a (checked) ``policy`` mapping as its class's ``Params``."""
    return make_params(policy_class(spec).Params, {k: v for k, v in spec.items() if k != "name"}, "policy")


def check_policy(spec) -> dict:
    """``policy``: a name or ``{name: NAME, ...params}``, validated; returns the full mapping (every parameter)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or spec.get("name") not in POLICIES:
        name = spec.get("name") if isinstance(spec, dict) else spec
        raise ConfigError(f"policy: {name!r} is not one of {', '.join(POLICIES)} (write policy: NAME or "
                          "policy: {name: NAME, PARAM: VALUE})")
    params = make_params(POLICIES[spec["name"]].Params, {k: v for k, v in spec.items() if k != "name"}, "policy")
    return {"name": spec["name"], **params_dict(params)}


def make_sequence_source(cfg):
    return policy_class(cfg.policy)(cfg, policy_params(cfg.policy))
