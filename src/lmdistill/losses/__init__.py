"""Distillation objectives: registered terms (``objective.TERMS``) over divergences, SFT, DAC-KL, span correlation,
MiniLLM's policy gradient, and the chunked path.

See ``docs/CONTRACTS.md`` (lmdistill.losses) for the interface and ``docs/METHODS.md`` for the formulas.

* :class:`~lmdistill.losses.objective.Objective`, :data:`~lmdistill.losses.objective.TERMS` - a recipe's
  weighted terms; :class:`~lmdistill.losses.term.Term` - what a term is.

* :func:`per_token_divergence` - the divergence at every position, no reduction.
* :func:`forward_kl`, :func:`reverse_kl`, :func:`jsd`, :func:`tvd`, :func:`skew_forward_kl`,
  :func:`skew_reverse_kl`, :func:`symmetric_kl`, :func:`sft_loss` - masked token means.
* :func:`get_loss` - the registry used by recipes and the command line.
* :func:`chunked_divergence` - the same losses from hidden states + LM head, in token chunks.
* :class:`~lmdistill.losses.dac_kl.DACKL`, :mod:`lmdistill.losses.span_correlation` - MGSR's losses.
"""

from lmdistill.losses.chunked import chunked_divergence
from lmdistill.losses.dac_kl import DACKL
from lmdistill.losses.divergences import DIVERGENCE_PARAMS, LOGPROB_FLOOR, per_token_divergence
from lmdistill.losses.functional import (
    forward_kl, jsd, reverse_kl, sft_loss, skew_forward_kl, skew_reverse_kl, symmetric_kl, tvd)
from lmdistill.losses.objective import TERMS, Objective
from lmdistill.losses.registry import LOSSES, get_loss
from lmdistill.losses.term import Term, TermInputs
from lmdistill.losses.span_correlation import SpanCorrelationLoss, span_correlation_loss, token_span_ids
from lmdistill.losses.vocab import MAX_VOCAB_PADDING, LossInputError, align_vocab

__all__ = ["DACKL", "DIVERGENCE_PARAMS", "LOGPROB_FLOOR", "LOSSES", "LossInputError", "MAX_VOCAB_PADDING",
           "Objective", "SpanCorrelationLoss", "TERMS", "Term", "TermInputs", "align_vocab", "chunked_divergence", "forward_kl", "get_loss", "jsd",
           "per_token_divergence", "reverse_kl", "sft_loss", "skew_forward_kl", "skew_reverse_kl",
           "span_correlation_loss", "symmetric_kl", "token_span_ids", "tvd"]
