"""The loss registry used by recipes and the command line: ``get_loss(name, **params)``."""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from lmdistill.errors import ConfigError
from lmdistill.losses import functional as F
from lmdistill.losses.divergences import check_divergence_params, check_temperature

#: Registered losses; short names and long names point to the same function.
LOSSES: dict[str, Callable] = {
    "fkl": F.forward_kl, "forward_kl": F.forward_kl,
    "rkl": F.reverse_kl, "reverse_kl": F.reverse_kl,
    "jsd": F.jsd,
    "tvd": F.tvd,
    "skl": F.skew_forward_kl, "skew_forward_kl": F.skew_forward_kl,
    "srkl": F.skew_reverse_kl, "skew_reverse_kl": F.skew_reverse_kl,
    "symkl": F.symmetric_kl, "symmetric_kl": F.symmetric_kl,
    "sft": F.sft_loss,
}


def loss_params(name: str) -> dict[str, object]:
    """Keyword parameters (with defaults) that ``get_loss(name, ...)`` accepts."""
    fn = LOSSES[name]
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def get_loss(name: str, **params) -> Callable:
    """Return the loss ``name`` with ``params`` bound (e.g. ``get_loss("jsd", beta=0.9)``).

    The result is called as ``loss(student_logits, teacher_logits, mask=None)`` (for ``sft`` the
    second argument is the labels).  Raises :class:`ConfigError` naming the valid choices for an
    unknown name or parameter, and for an out-of-range value.
    """
    if not isinstance(name, str) or name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    allowed = loss_params(name)
    extra = sorted(set(params) - set(allowed))
    if extra:
        raise ConfigError(f"loss {name!r} got unknown parameter(s) {', '.join(extra)}; "
                          f"valid: {', '.join(allowed) or 'none'}")
    fn = LOSSES[name]
    # validate values now, so a bad recipe fails at start-up instead of at the first step
    if "temperature" in params:
        check_temperature(params["temperature"])
    div_params = {k: v for k, v in params.items() if k in ("alpha", "beta", "lam")}
    if div_params:
        short = {F.jsd: "jsd", F.skew_forward_kl: "skl", F.skew_reverse_kl: "srkl", F.symmetric_kl: "symkl"}[fn]
        check_divergence_params(short, div_params)
    bound = functools.partial(fn, **params)
    functools.update_wrapper(bound, fn)
    return bound
