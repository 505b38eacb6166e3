"""Sampling settings shared by every generation policy."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lmdistill.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn, and the knobs of the policies that need them: the one sampling config of training
    (the recipe's ``sampling:``), ``generate``, ``eval`` and validation. Every knob has its one default here.

    - ``max_new_tokens``: at most this many response tokens (EOS included).
    - ``temperature``, ``top_k`` (0 = off), ``top_p`` (1.0 = off): applied in that order (as HF does).
      ``do_sample=False`` or ``temperature=0`` is greedy decoding.
    - ``seed``: the same seed gives the same output. ``None`` draws fresh randomness.
    - ``no_repeat_ngram_size``: ``n > 0`` forbids any token that would repeat an n-gram already in the row
      (prompt included, its left padding not), as transformers' ``NoRepeatNGramLogitsProcessor``; 0 = off. The
      MiniLLM/DistiLLM evaluation protocol uses 6 (``evaluate.EvalSettings`` sets it). Banned ids get -inf before
      temperature, top-k and top-p, greedy included, in every policy (``sampling.NgramBan``); SWITCH's JSD and
      SCRG's KL compare the unbanned distributions (``policies/switch.py``, ``policies/scrg.py``).
    - ``mixed_student_prob``: ``mixed`` (GKD's lambda) takes the student's samples with this probability,
      else the gold responses (the teacher's sample for a row with none).
    - ``mixed_coin``: ``batch`` (default: one coin for the whole batch, as TRL's ``GKDTrainer`` and the GKD
      paper's Algorithm 1 do) or ``sequence`` (one coin per row).
    - ``mixed_off_policy``: what ``mixed`` trains on when the coin says off-policy: ``gold`` (default, the dataset's
      responses) or ``teacher`` (the teacher's sample of the row, at these same sampling settings: TRL's
      ``GKDConfig.seq_kd=True``, whose ``training_step`` tries the student's coin first and only then the teacher).
    - ``switch_tau0``, ``switch_decay``: ``switch`` uses the teacher's token when
      JSD(p_t, q_t) > switch_tau0 * exp(-switch_decay * t), t the response position in tokens. ``switch_tau0 = inf``
      never switches (pure student), ``switch_tau0 < 0`` always does (pure teacher). Calibrated on 256-token samples
      (bench/switch_fraction.py, SmolLM2-135M teacher, SFT-initialised 10-layer student): 0.7 and 0.01 per token
      gave 45% teacher tokens (the paper's best: ~53%; 33% at tau0 1.0, 71% at 0.5); the paper's "decay factor 1/10"
      read per token (0.1) leaves the threshold near 0 after ~30 tokens and the teacher writes 94-100% of them.
    - ``switch_draft_tokens``, ``switch_draft_min``: SWITCH's speculative verification (``generation/speculative.py``):
      the student drafts up to ``switch_draft_tokens`` tokens and the teacher checks them in one forward pass; the
      draft length adapts between ``switch_draft_min`` and ``switch_draft_tokens``. ``switch_draft_tokens = 0``: one
      teacher step per token (``policies/switch.py``). The tokens are the same either way (to float rounding). 4:
      on the CPU benchmark (bench/README.md, issue 19) neutral at batch 8 with a third teacher tokens, 0.57-0.89x
      the time of one step per token at batch 1; larger bounds pay only where takeovers are rare.
    - ``scrg_rounds``: rounds of correction + re-generation for ``scrg`` (MGSR).
    - ``teacher_mix_alpha``: ``teacher_mix`` (MiniLLM) samples from ``alpha * p + (1 - alpha) * q``.
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
    mixed_student_prob: float = 0.5
    mixed_coin: str = "batch"
    mixed_off_policy: str = "gold"
    switch_tau0: float = 0.7
    switch_decay: float = 0.01
    switch_draft_tokens: int = 4
    switch_draft_min: int = 1
    scrg_rounds: int = 1
    teacher_mix_alpha: float = 0.2
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
        if self.mixed_coin not in ("batch", "sequence"):
            raise bad(f"mixed_coin must be 'batch' or 'sequence', got {self.mixed_coin!r}")
        if self.mixed_off_policy not in ("gold", "teacher"):
            raise bad(f"mixed_off_policy must be 'gold' or 'teacher' (TRL's seq_kd), got {self.mixed_off_policy!r}")
        if not (isinstance(self.mixed_student_prob, (int, float)) and 0 <= self.mixed_student_prob <= 1):
            raise bad(f"mixed_student_prob must be in [0, 1], got {self.mixed_student_prob!r}")
        if not isinstance(self.switch_tau0, (int, float)) or math.isnan(self.switch_tau0):
            raise bad(f"switch_tau0 must be a number (inf allowed), got {self.switch_tau0!r}")
        if not (isinstance(self.switch_decay, (int, float)) and math.isfinite(self.switch_decay) and self.switch_decay >= 0):
            raise bad(f"switch_decay must be a finite number >= 0, got {self.switch_decay!r}")
        if not isinstance(self.switch_draft_tokens, int) or self.switch_draft_tokens < 0:
            raise bad(f"switch_draft_tokens must be an integer >= 0 (0 = off), got {self.switch_draft_tokens!r}")
        if not isinstance(self.switch_draft_min, int) or self.switch_draft_min < 1:
            raise bad(f"switch_draft_min must be an integer >= 1, got {self.switch_draft_min!r}")
        if self.switch_draft_tokens and self.switch_draft_min > self.switch_draft_tokens:
            raise bad(f"switch_draft_min ({self.switch_draft_min}) exceeds switch_draft_tokens "
                      f"({self.switch_draft_tokens})")
        if not isinstance(self.scrg_rounds, int) or self.scrg_rounds < 0:
            raise bad(f"scrg_rounds must be an integer >= 0, got {self.scrg_rounds!r}")
        if not (isinstance(self.teacher_mix_alpha, (int, float)) and 0 <= self.teacher_mix_alpha <= 1):
            raise bad(f"teacher_mix_alpha must be in [0, 1], got {self.teacher_mix_alpha!r}")
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

    def threshold(self, step: int) -> float:
        """SWITCH's tau_t = switch_tau0 * exp(-switch_decay * t); infinite switch_tau0 stays infinite (never 0 * inf)."""
        if math.isinf(self.switch_tau0):
            return self.switch_tau0
        return self.switch_tau0 * math.exp(-self.switch_decay * step)

    def to_dict(self) -> dict:
        return asdict(self)
