"""What a run asks of its teacher and of its policy's batches, from the policy and the objective's terms.

The one check of policy x terms x teacher: :func:`run_needs` lists the run's :class:`~lmdistill.teachers.base.Need`s
(the policy's, to write its sequences; each term's, to score them), which ``teachers.check_spec`` compares with what
the teacher kind gives before anything loads (``TrainConfig.check``) and ``Teacher.check`` again once it opens;
:func:`check_fields` confirms the policy's batches carry what the terms read beside the tokens. ``lmdistill
generate`` asks :func:`policy_need` of its engine policy, ``capture`` needs the teacher's logits.
"""

from __future__ import annotations

from lmdistill.errors import ConfigError
from lmdistill.losses.objective import entry_name, entry_params, term_class
from lmdistill.teachers.base import Need
from lmdistill.train.sources import policy_class, policy_params


def policy_need(name: str, needs: tuple[str, ...], temperature: float | None = None) -> list[Need]:
    """The need of policy ``name`` that asks the teacher for ``needs`` (any one of them); SCRG compares the models
    at the sampling temperature."""
    if not needs:
        return []
    return [Need(f"policy {name}", needs, temperature if "sequence_scores" in needs else None)]


def run_needs(cfg) -> list[Need]:
    """Every need of the run ``cfg``: its policy's, and each term's that reads the teacher (on sequences made during
    training when the policy writes them)."""
    cls, params = policy_class(cfg.policy), policy_params(cfg.policy)
    needs = policy_need(cfg.policy["name"], cls.teacher_needs(params), cfg.sampling_config(0).divergence_temperature)
    writes = cls.generator(params) is not None
    for e in cfg.objective:
        if e["weight"] <= 0:
            continue
        any_of, temperature = term_class(e).teacher_needs(entry_params(e))
        if any_of:
            needs.append(Need(f"term {entry_name(e)}", any_of, temperature, new_sequences=writes))
    return needs


def check_fields(cfg) -> None:
    """Every field a term reads beside the tokens is one the policy's batches carry, with the same properties; and
    every term takes the policy's sequences as sampled (``Term.check_sequences``: ``opd`` needs the student's own)."""
    cls, params = policy_class(cfg.policy), policy_params(cfg.policy)
    given = cls.provides(params)
    for e in cfg.objective:
        if e["weight"] <= 0:
            continue
        term_class(e).check_sequences(entry_params(e), cfg.policy["name"], cfg.sampling_config(0),
                                      f"objective ({entry_name(e)})")
        for name, (required, props) in term_class(e).needs_fields(entry_params(e)).items():
            if name not in given:
                if required:
                    have = ", ".join(given) or "none"
                    raise ConfigError(f"objective ({entry_name(e)}): reads the batch field {name!r}, which policy "
                                      f"{cfg.policy['name']} does not provide (its fields: {have})")
                continue
            differ = {k: (v, given[name].get(k)) for k, v in props.items() if given[name].get(k, v) != v}
            if differ:
                shown = "; ".join(f"{k} {a!r} for the term, {b!r} from the policy" for k, (a, b) in differ.items())
                raise ConfigError(f"objective ({entry_name(e)}): the batch field {name!r} of policy "
                                  f"{cfg.policy['name']} does not match ({shown}); set them equal")
