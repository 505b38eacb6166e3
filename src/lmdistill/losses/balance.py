"""One objective entry rescaled to another's magnitude (``balance_with: NAME``), as NVIDIA ModelOpt balances its
intermediate-state losses against the logit loss.

ModelOpt's ``LogitsAndIntermediatesLossBalancer.forward`` (``modelopt/torch/distill/plugins/megatron.py:480-516``,
the default balancer of its Megatron distillation, lines 156-159) takes the mean of the intermediate losses ``I``
and the logit loss ``K`` of one micro-batch and, when ``I > 0``, multiplies ``I`` by ``K.detach() / I.detach()``
(lines 496-498): the scaled term's value equals the logit loss's, its gradient is ``I``'s times that constant; the
total is ``K + I * K / I`` without the LM loss (``skip_lm_loss``, line 503-504). Here the entry that names
``balance_with: fkl`` is rescaled the same way, per micro-batch, before its weight and token share are applied
(``Objective.forward``); with weights 1 and 1 the objective is ModelOpt's.
"""

from __future__ import annotations

import torch


def balanced(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``value * (reference / value)`` with the ratio detached: the value of ``reference``, the gradient direction
    of ``value``; a ``value <= 0`` is left as it is (ModelOpt's ``if intermediate_loss > 0``)."""
    v = value.detach()
    scale = torch.where(v > 0, reference.detach().to(v.dtype) / v.clamp_min(torch.finfo(v.dtype).tiny),
                        torch.ones_like(v))
    return value * scale
