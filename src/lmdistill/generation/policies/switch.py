"""``switch``: SWITCH (arXiv 2410.19503), the student writes and the teacher steps in.

At response step t both models give next-token logits over the shared vocabulary. When
``JSD(p_t, q_t) > tau_t = tau0 * exp(-decay * t)`` the token is sampled from the teacher, otherwise
from the student.

Our choices (docs/METHODS.md leaves them open): the JSD is the symmetric one (beta = 0.5, in nats, between
0 and ln 2) of ``softmax(logits / T)`` at the sampling temperature T (T = 1 when greedy), computed by
``lmdistill.losses.per_token_divergence("jsd", ...)``; the student's and the teacher's candidate tokens
are drawn with the same noise, so ``tau0 = inf`` reproduces ``student`` and ``tau0 < 0`` ``teacher``
token for token. ``stats["jsd"]`` is the per-step trace and ``stats["teacher_fraction"]`` the share of
teacher tokens. Rows that finished at EOS leave both models' forward passes (``decode.ActiveRows``).

``no_repeat_ngram_size = n > 0``: whichever model writes step t draws from its own distribution with the
row's banned ids (those that would repeat an n-gram of prompt + tokens so far; ``sampling.NgramBan``) set to
-inf, so the response never repeats an n-gram. The JSD that decides who writes is computed on the unbanned
distributions: it measures how far the two models disagree, and the ban (the same ids for both, as they share
the context) is a decoding constraint, not part of either model; banning first would also renormalise both
over the allowed ids and make the trace depend on n. ``stats["jsd"]`` is therefore the same with and without a
ban for the same tokens.

Two loops compute this rule, with the same tokens, sources, trace and lengths (exactly in float64; float32
rounding of a multi-token forward differs from single steps, see ``generation/speculative.py``):

- ``draft_tokens = 0``: ``stepwise`` below, one cached step per model per token.
- ``draft_tokens = k_max > 0`` (the default): ``speculative.run``. The student drafts up to k tokens
  exactly as it would write them alone; the teacher scores all k positions in one forward pass; the first
  position where the rule fires takes the teacher's token and the drafts after it are dropped.

``stats["teacher_forwards"]`` / ``stats["student_forwards"]``: the forward passes (prefill included) each model
ran while the row was unfinished; per generated token that is 1 for ``stepwise``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lmdistill.generation import speculative
from lmdistill.generation.batch import PADDING, STUDENT, TEACHER, Batch, Decoded, mark_eos
from lmdistill.errors import ConfigError
from lmdistill.generation.decode import ActiveRows, no_eos
from lmdistill.generation.policies.base import Policy
from lmdistill.generation.sampling import NgramBan, pick
from lmdistill.losses import per_token_divergence


@dataclass(frozen=True)
class SwitchParams:
    """SWITCH's rule and its speculative loop.

    - ``tau0``, ``decay``: the teacher's token is used when JSD(p_t, q_t) > tau0 * exp(-decay * t), t the response
      position in tokens. ``tau0 = inf`` never switches (pure student), ``tau0 < 0`` always does (pure teacher).
      Calibrated on 256-token samples (bench/switch_fraction.py, SmolLM2-135M teacher, SFT-initialised 10-layer
      student): 0.7 and 0.01 per token gave 45% teacher tokens (the paper's best: ~53%; 33% at tau0 1.0, 71% at
      0.5); the paper's "decay factor 1/10" read per token (0.1) leaves the threshold near 0 after ~30 tokens and
      the teacher writes 94-100% of them.
    - ``draft_tokens``, ``draft_min``: speculative verification (``generation/speculative.py``): the student drafts
      up to ``draft_tokens`` tokens and the teacher checks them in one forward pass; the draft length adapts between
      ``draft_min`` and ``draft_tokens``. ``draft_tokens = 0``: one teacher step per token. The tokens are the same
      either way (to float rounding). 4: on the CPU benchmark (bench/README.md, issue 19) neutral at batch 8 with a
      third teacher tokens, 0.57-0.89x the time of one step per token at batch 1.
    """

    tau0: float = field(default=0.7, metadata={"help": "JSD threshold at step 0 (inf = never switch)"})
    decay: float = field(default=0.01, metadata={"help": "threshold decay per token: tau_t = tau0 * exp(-decay * t)"})
    draft_tokens: int = field(default=4, metadata={"help": "speculative verification: most tokens the student drafts "
                                                           "per teacher pass (0 = one teacher step per token)"})
    draft_min: int = field(default=1, metadata={"help": "speculative verification: fewest tokens per draft"})

    def __post_init__(self):
        if not isinstance(self.tau0, (int, float)) or math.isnan(self.tau0):
            raise ConfigError(f"tau0: must be a number (inf allowed), got {self.tau0!r}")
        if not (isinstance(self.decay, (int, float)) and math.isfinite(self.decay) and self.decay >= 0):
            raise ConfigError(f"decay: must be a finite number >= 0, got {self.decay!r}")
        if not isinstance(self.draft_tokens, int) or self.draft_tokens < 0:
            raise ConfigError(f"draft_tokens: must be an integer >= 0 (0 = off), got {self.draft_tokens!r}")
        if not isinstance(self.draft_min, int) or self.draft_min < 1:
            raise ConfigError(f"draft_min: must be an integer >= 1, got {self.draft_min!r}")
        if self.draft_tokens and self.draft_min > self.draft_tokens:
            raise ConfigError(f"draft_min: ({self.draft_min}) exceeds draft_tokens ({self.draft_tokens})")

    def threshold(self, step: int) -> float:
        """tau_t = tau0 * exp(-decay * t); an infinite tau0 stays infinite (never 0 * inf)."""
        if math.isinf(self.tau0):
            return self.tau0
        return self.tau0 * math.exp(-self.decay * step)


def run(student, teacher, batch: Batch) -> Decoded:
    loop = speculative.run if batch.params.draft_tokens else stepwise
    return decoded(*loop(student, teacher, batch))


def decoded(tokens, sources, trace, lengths, teacher_forwards, student_forwards) -> Decoded:
    """The policy's result from what both loops return (per-row tensors in the caller's row order)."""
    stats = [{"jsd": row[:k], "teacher_tokens": sum(1 for x in src[:k] if x == TEACHER),
              "teacher_forwards": tf, "student_forwards": sf}
             for row, src, k, tf, sf in zip(trace.tolist(), sources.tolist(), lengths.tolist(),
                                            teacher_forwards.tolist(), student_forwards.tolist())]
    return Decoded(tokens, lengths, sources, stats)


def stepwise(student, teacher, batch: Batch):
    """``(tokens, sources, trace, lengths, teacher_forwards, student_forwards)``, one step per model per token."""
    cfg, n, v, dev = batch.config, batch.max_new_tokens, batch.vocab, batch.device
    s_lm, t_lm = batch.runner(student), batch.runner(teacher)
    q, p = s_lm.prefill(), t_lm.prefill()
    b = q.shape[0]
    temp = cfg.divergence_temperature
    tokens, sources, trace, lengths, done, pad = speculative.output_buffers(batch, b)
    tags = torch.tensor([STUDENT, TEACHER], dtype=torch.long, device=dev)
    rows = ActiveRows([s_lm, t_lm], batch.noise, b, ban=NgramBan.of(batch))  # finished rows leave the forward passes
    for t in range(n):
        k = rows.k  # the unfinished rows are slots [:k]
        qk, pk = q[:k, :v], p[:k, :v].to(dev)
        d = per_token_divergence("jsd", qk, pk, temperature=temp, beta=0.5)  # unbanned (see the docstring)
        use_teacher = d > batch.params.threshold(t)
        noise = None if cfg.greedy else rows.noise.gumbel(t, rows=k)
        banned = rows.banned(tokens, t)
        nxt = pad.clone()
        nxt[:k] = torch.where(use_teacher, pick(pk, cfg, noise, banned=banned), pick(qk, cfg, noise, banned=banned))
        nxt = torch.where(done, pad, nxt)
        tokens[:, t] = nxt
        sources[:k, t] = tags[use_teacher.long()]
        sources[:, t] = torch.where(done, PADDING, sources[:, t])
        trace[:k, t] = d
        done, lengths = mark_eos(nxt, t, done, lengths, batch.eos_id)
        if t == n - 1:
            break
        finished = done.all() if batch.eos_id is not None else no_eos(batch)
        stop, (tokens, sources, trace, lengths, done, q, p) = rows.update(
            ~done, finished, [tokens, sources, trace, lengths, done, q, p])
        if stop:
            break
        q, p = rows.step(s_lm, tokens[:, t], q), rows.step(t_lm, tokens[:, t], p)
    tokens, sources, trace, lengths = (rows.to_caller(x) for x in (tokens, sources, trace, lengths))
    rows.restore()
    # a row of length L took part in the prefill and L - 1 steps of each model
    return tokens, sources, trace, lengths, lengths, lengths


POLICY = Policy("switch", run, SwitchParams, teacher=("steps",),
                aliases={"tau0": ["--tau0"], "decay": ["--lam"]})
