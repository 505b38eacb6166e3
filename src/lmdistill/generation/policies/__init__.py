"""Generation policies: one module each, each with one :class:`~.base.Policy` (name, parameters, what it asks of the
teacher, ``run(student, teacher, batch) -> Decoded``)."""

from lmdistill.generation.policies import mixed, scrg, student, switch, teacher, teacher_mix
from lmdistill.generation.policies.base import NoParams, Policy, make_params, params_dict

#: Every engine policy by name.
POLICIES: dict[str, Policy] = {m.POLICY.name: m.POLICY for m in (student, teacher, mixed, switch, scrg, teacher_mix)}

__all__ = ["NoParams", "POLICIES", "Policy", "make_params", "params_dict"]
