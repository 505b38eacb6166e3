"""What a generation policy is: a name, its parameters, what it asks of the teacher, and how it writes sequences.

A policy module defines a frozen dataclass of its knobs (``Params``: every field has the policy's default and is
validated in ``__post_init__``) and one :class:`Policy`; ``policies/__init__.py`` lists them. The recipe nests the
knobs under the policy (``policy: {name: switch, tau0: 0.7}``), ``lmdistill generate`` makes a flag of each
(``--switch-tau0``), and :class:`~lmdistill.generation.config.SamplingConfig` keeps only how tokens are drawn.

What a policy asks of the teacher is a tuple of capabilities any one of which will do (``teachers.base``): ``steps``
(the teacher's next-token distribution at every generated step: a model in this process) or ``sequence_scores``
(scores of whole written sequences: a served teacher can give them). ``()``: no teacher.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Callable

from lmdistill.errors import ConfigError


@dataclass(frozen=True)
class NoParams:
    """A policy without knobs."""


def scalar(value, want: type):
    """``value`` as ``want`` (bool, int or float), command-line text included ("yes", "3", "0.5"), or None when it is
    not one: an int never takes 2.5 nor a bool. Shared by policy parameters and ``train.recipes``' keys."""
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif want in (int, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (want is float or isinstance(value, int)):
            return want(value)
        if isinstance(value, str):
            try:
                return want(value)
            except ValueError:
                pass
    return None


def _coerce(value, want, where: str):
    """``value`` as the field type ``want`` (command-line text included); a ``ConfigError`` naming ``where``."""
    if want in (bool, int, float):
        out = scalar(value, want)
        if out is not None:
            return out
    elif want is str:
        if isinstance(value, str):
            return value
    else:
        return value   # unions and nested values: the dataclass checks them
    raise ConfigError(f"{where}: must be {want.__name__}, got {type(value).__name__} {value!r}")


def make_params(params_type: type, values: dict, where: str):
    """An instance of ``params_type`` from ``values``; an unknown key names the closest valid one."""
    if isinstance(values, params_type):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: must be a mapping of the policy's parameters, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(params_type)}
    hints = typing.get_type_hints(params_type)
    out = {}
    for k, v in values.items():
        if k not in fields:
            close = difflib.get_close_matches(k, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown parameter {k!r}{hint} (valid: {', '.join(fields) or 'none'})")
        out[k] = _coerce(v, hints[k], f"{where}.{k}")
    try:
        return params_type(**out)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from None


def params_dict(params) -> dict:
    return dataclasses.asdict(params)


@dataclass(frozen=True)
class Policy:
    """One generation policy (module docstring). ``run(student, teacher, batch) -> Decoded`` reads its knobs from
    ``batch.params``; ``needs(params, all_gold)`` what it asks of the teacher (default: ``teacher``)."""

    name: str
    run: Callable
    Params: type = NoParams
    teacher: tuple[str, ...] = ()
    needs: Callable | None = None
    #: per-batch values its sequences carry for the terms (``fields(params) -> dict``; teacher_mix: ``mix_alpha``)
    fields: Callable | None = None
    #: old command-line spellings of a knob (``field -> [flags]``), kept as aliases of the generated flag
    aliases: dict = dataclasses.field(default_factory=dict)

    def params(self, values=None, where: str | None = None):
        return make_params(self.Params, values or {}, where or f"policy ({self.name})")

    def teacher_needs(self, params=None, all_gold: bool = True) -> tuple[str, ...]:
        """The teacher capabilities the policy needs with ``params`` (any one of them), ``()`` for none;
        ``all_gold``: every row has a gold response."""
        params = self.params() if params is None else params
        return self.needs(params, all_gold) if self.needs is not None else self.teacher

    def batch_fields(self, params) -> dict:
        return self.fields(params) if self.fields is not None else {}

    def flag(self, field_name: str) -> str:
        return f"--{self.name}-{field_name}".replace("_", "-")
