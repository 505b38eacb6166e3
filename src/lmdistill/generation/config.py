"""Sampling settings shared by every generation policy."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lmdistill.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn: the one sampling config of training (the recipe's ``sampling:``), ``generate``, ``eval``
    and validation. A policy's own knobs (SWITCH's threshold, GKD's student share, ...) are its parameters
    (``policies/*.py``, ``policy: {name: ..., ...}`` in a recipe), not sampling settings.

    - ``max_new_tokens``: at most this many response tokens (EOS included).
    - ``temperature``, ``top_k`` (0 = off), ``top_p`` (1.0 = off): applied in that order (as HF does).
      ``do_sample=False`` or ``temperature=0`` is greedy decoding.
    - ``seed``: the same seed gives the same output. ``None`` draws fresh randomness.
    - ``no_repeat_ngram_size``: ``n > 0`` forbids any token that would repeat an n-gram already in the row
      (prompt included, its left padding not), as transformers' ``NoRepeatNGramLogitsProcessor``; 0 = off. The
      MiniLLM/DistiLLM evaluation protocol uses 6 (``evaluate.EvalSettings`` sets it). Banned ids get -inf before
      temperature, top-k and top-p, greedy included, in every policy (``sampling.NgramBan``); SWITCH's JSD and
      SCRG's KL compare the unbanned distributions (``policies/switch.py``, ``policies/scrg.py``).
    - ``vocab_size``: sample only among the first ``vocab_size`` ids (default: the smallest vocabulary
      of the models in use; teacher and student may differ by padding rows).
    - ``decoder``: how models are run step by step. ``fast`` is the Llama-family forward over the
      model's weights with a preallocated cache (``fast_decoder.py``), ``hf`` is ``model(...)`` with a
      ``DynamicCache`` (any architecture), ``auto`` (default) takes ``fast`` for every model it supports.
      Both compute the same logits (to float rounding).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    do_sample: bool = True
    no_repeat_ngram_size: int = 0
    vocab_size: int | None = None
    decoder: str = "auto"

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"SamplingConfig: {msg}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise bad(f"no_repeat_ngram_size must be an integer >= 0 (0 = off), got {self.no_repeat_ngram_size!r}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            raise bad(f"vocab_size must be a positive integer or None, got {self.vocab_size!r}")
        if self.decoder not in ("auto", "fast", "hf"):
            raise bad(f"decoder must be one of auto, fast, hf, got {self.decoder!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @property
    def divergence_temperature(self) -> float:
        """Temperature of the distributions SWITCH and SCRG compare: the sampling one (1 when greedy)."""
        return 1.0 if self.greedy else float(self.temperature)

    def to_dict(self) -> dict:
        return asdict(self)


#: Sampling keys that were policy knobs before issue 31: where each lives now (``policy.NAME.FIELD``).
MOVED_TO_POLICY = {"mixed_student_prob": ("mixed", "student_prob"), "mixed_coin": ("mixed", "coin"),
                   "mixed_off_policy": ("mixed", "off_policy"), "switch_tau0": ("switch", "tau0"),
                   "switch_decay": ("switch", "decay"), "switch_draft_tokens": ("switch", "draft_tokens"),
                   "switch_draft_min": ("switch", "draft_min"), "scrg_rounds": ("scrg", "rounds"),
                   "teacher_mix_alpha": ("teacher_mix", "alpha")}
