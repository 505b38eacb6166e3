"""Recipes written for earlier lmdistill: refused with their translation printed, never guessed.

- The old flat format (``loss``, ``kd_weight``, ``tau0``, ...; before issue 15): a method is now a list of weighted
  terms and one sampling section (:func:`old_format_error` prints the new recipe).
- Policy knobs that were sampling settings or top-level keys (before issue 31: ``sampling.switch_tau0``,
  ``replay_capacity``, a ``pg_rkl`` entry's ``ppo_epochs``): they are the policy's parameters now,
  ``policy: {name: switch, tau0: 0.7}`` (:func:`moved_key_error` says where each went).
"""

from __future__ import annotations

import yaml

from lmdistill.errors import ConfigError
from lmdistill.generation.config import MOVED_TO_POLICY

#: Top-level keys of DistiLLM's replay before issue 31 -> the ``replay`` policy's parameter.
MOVED_REPLAY = {"replay_capacity": "capacity", "replay_init_threshold": "init_threshold",
                "replay_threshold_step": "threshold_step", "replay_loss_eps": "loss_eps", "replay_policy": "generator"}


def moved_key_error(key: str, value, was: str | None = None) -> ConfigError:
    """``key`` (``sampling.switch_tau0`` or ``replay_capacity``; ``was``: the name the user wrote, when older still)
    belongs to a policy's parameters now."""
    bare = key.removeprefix("sampling.")
    policy, name = MOVED_TO_POLICY.get(bare) or ("replay", MOVED_REPLAY[bare])
    shown = value if not isinstance(value, str) else repr(value)
    return ConfigError(f"{was or key}: is a parameter of the {policy} policy now: write policy: {{name: {policy}, "
                       f"{name}: {shown}}} in the recipe, or policy.{name}={value} on the command line (with "
                       f"policy={policy})")

# ---------------------------------------------------------------------------------------------- the old format
#: Sampling keys of the old flat format and their names in ``sampling:``.
OLD_SAMPLING = {"max_new_tokens": "max_new_tokens", "gen_temperature": "temperature", "gen_top_k": "top_k",
                "gen_top_p": "top_p", "gen_decoder": "decoder", "mix_lambda": "mixed_student_prob",
                "tau0": "switch_tau0", "lam": "switch_decay", "n_corrections": "scrg_rounds",
                "teacher_mix_alpha": "teacher_mix_alpha"}
OLD_OBJECTIVE = ("loss", "loss_params", "temperature", "sft_weight", "kd_weight", "seq_sft_weight", "span_weight",
                 "span_prior", "dac_kl", "pg_clip", "pg_length_norm")


def translate_old(values: dict) -> dict:
    """The new ``objective`` and ``sampling`` of a recipe written in the old flat format (``loss``, ``kd_weight``,
    ``tau0``, ...), with the old defaults (sft weight 1, no divergence)."""
    out: dict = {}
    t = values.get("temperature", 1.0)
    temp = {"temperature": t} if t != 1.0 else {}
    objective = []
    if values.get("sft_weight", 1.0) > 0:
        objective.append({"term": "sft", "weight": values.get("sft_weight", 1.0)})
    if values.get("seq_sft_weight", 0.0) > 0:
        objective.append({"term": "seq_sft", "weight": values["seq_sft_weight"]})
    loss = values.get("loss", "none")
    if loss != "none" and values.get("kd_weight", 0.0) > 0:
        params = dict(values.get("loss_params") or {})
        if loss == "dac_kl":
            params = dict(values.get("dac_kl") or {})
        if loss == "pg_rkl":
            params = {k2: values[k1] for k1, k2 in (("pg_clip", "clip"), ("pg_length_norm", "length_norm"))
                      if k1 in values}
        objective.append({"term": loss, "weight": values["kd_weight"], **temp, **params})
    if values.get("span_weight", 0.0) > 0:
        prior = {"prior": values["span_prior"]} if "span_prior" in values else {}
        objective.append({"term": "span", "weight": values["span_weight"], **temp, **prior})
    if any(k in values for k in OLD_OBJECTIVE):
        out["objective"] = objective
    sampling = {new: values[old] for old, new in OLD_SAMPLING.items() if old in values and new not in MOVED_TO_POLICY}
    if sampling:
        out["sampling"] = sampling
    moved = [(MOVED_TO_POLICY[new], values[old]) for old, new in OLD_SAMPLING.items()
             if old in values and new in MOVED_TO_POLICY]
    if moved:   # the knobs of the recipe's own policy (another policy's knobs had no effect under it)
        own = values.get("policy")
        name = own if any(policy == own for (policy, _), _v in moved) else own or moved[0][0][0]
        out["policy"] = {"name": name, **{field: v for (policy, field), v in moved if policy == name}}
    return out


def old_format_error(values: dict, where: str) -> ConfigError:
    old = [k for k in values if k in OLD_SAMPLING or k in OLD_OBJECTIVE]
    new = yaml.safe_dump(translate_old(values), sort_keys=False, default_flow_style=None).strip()
    return ConfigError(f"{where}key(s) {', '.join(old)} belong to the old recipe format; a method is now a list of "
                       f"weighted terms and one sampling section. Write instead:\n{new}")


def old_override_error(key: str, value) -> ConfigError:
    if key in OLD_SAMPLING:
        new = OLD_SAMPLING[key]
        if new in MOVED_TO_POLICY:
            return ConfigError(f"override: {moved_key_error(new, value, was=key)}")
        return ConfigError(f"override: {key!r} is now sampling.{new} (write sampling.{new}={value})")
    return ConfigError(f"override: {key!r} belongs to the old recipe format; edit the objective's terms instead, "
                       f"e.g. objective.sft.weight=0.5, objective.jsd.beta=0.9, objective.span.weight=1 "
                       f"(see --print-config for the recipe's terms)")
