"""Testing a distillation detector on ground truth: how well a per-prompt score tells models distilled from a
teacher ("positives") from models that were not ("negatives"), as an AUC with a bootstrap interval over prompts.

What is scored. Every model ``M`` answers the same prompts ``p = 1..n``; a metric gives one number per (model,
prompt), oriented so that higher means closer to the teacher: e.g. the judge-free RSE similarity of ``M``'s answer
to the teacher's answer, or minus the white-box KL(teacher || M) averaged over the tokens of the teacher's answer.

The statistic. On prompt ``p``, with positives ``P`` and negatives ``N``::

    AUC_p = 1 / (|P| |N|) * sum_{i in P} sum_{j in N} ( [s_ip > s_jp] + 0.5 [s_ip == s_jp] )

and ``AUC = (1/n) sum_p AUC_p``: the probability that a distilled model scores above an independent one on the same
prompt, the (prompt, distilled model, independent model) triple drawn uniformly, ties counted one half. 0.5 is
chance, 1 a perfect detector, below 0.5 a detector that points the wrong way. Comparing models on the same prompt
keeps prompt difficulty (a short teacher answer is easy to resemble) out of the comparison.

The interval. Prompts are the resampled unit: ``resamples`` times, draw ``n`` prompts with replacement (a seeded
``numpy`` generator) and take the mean of their ``AUC_p``; the interval is the percentile interval of those means
(``level`` 0.95: the 2.5th and 97.5th percentiles, numpy's linear interpolation). The models are fixed, not
resampled: the interval speaks for these models on other prompts, not for other models. A metric "cannot tell
them apart" when the interval contains 0.5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lmdistill.errors import ConfigError

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Separation:
    auc: float
    low: float
    high: float
    prompts: int
    positives: tuple[str, ...]
    negatives: tuple[str, ...]
    resamples: int
    level: float

    @property
    def verdict(self) -> str:
        """``separates`` (interval above 0.5), ``reversed`` (below) or ``cannot tell apart`` (contains 0.5)."""
        return "separates" if self.low > 0.5 else "reversed" if self.high < 0.5 else "cannot tell apart"

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def prompt_aucs(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """``AUC_p`` of every prompt from score matrices ``pos`` (positives x prompts) and ``neg`` (negatives x prompts)."""
    diff = pos[:, None, :] - neg[None, :, :]                 # (positives, negatives, prompts)
    wins = (diff > 0).astype(np.float64) + 0.5 * (diff == 0)
    return wins.mean(axis=(0, 1))


def _matrix(scores: dict[str, dict[str, float]], models: list[str], prompts: list[str], sign: float) -> np.ndarray:
    return np.array([[sign * float(scores[m][p]) for p in prompts] for m in models], dtype=np.float64)


def shared_prompts(scores: dict[str, dict[str, float]], models: list[str]) -> list[str]:
    """The prompts every one of ``models`` has a finite score for, in the first model's order."""
    first = scores[models[0]]
    return [p for p in first if all(p in scores[m] and np.isfinite(scores[m][p]) for m in models)]


def separation(scores: dict[str, dict[str, float]], positives: list[str], negatives: list[str], *,
               higher_is_closer: bool = True, resamples: int = RESAMPLES, level: float = LEVEL,
               seed: int = 0) -> Separation:
    """AUC of telling ``positives`` from ``negatives`` by ``scores[model][prompt]``, with its percentile bootstrap
    interval over prompts (module docstring). ``higher_is_closer=False`` for a distance such as the KL. Only the
    prompts every model was scored on count."""
    missing = [m for m in (*positives, *negatives) if m not in scores]
    if missing or not positives or not negatives:
        raise ConfigError(f"separation: need scores of at least one positive and one negative model "
                          f"(missing: {', '.join(missing) or 'none'})")
    if resamples < 1 or not 0 < level < 1:
        raise ConfigError(f"separation: resamples {resamples} must be >= 1 and level {level} in (0, 1)")
    prompts = shared_prompts(scores, [*positives, *negatives])
    if not prompts:
        raise ConfigError("separation: no prompt was scored for every model")
    sign = 1.0 if higher_is_closer else -1.0
    aucs = prompt_aucs(_matrix(scores, positives, prompts, sign), _matrix(scores, negatives, prompts, sign))
    draws = np.random.default_rng(seed).integers(0, len(prompts), size=(resamples, len(prompts)))
    means = aucs[draws].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return Separation(float(aucs.mean()), float(low), float(high), len(prompts), tuple(positives), tuple(negatives),
                      resamples, level)


def separation_sentence(metric: str, s: Separation) -> str:
    """One sentence for the report: what the interval says about ``metric``."""
    span = f"AUC {s.auc:.2f}, {100 * s.level:.0f}% interval {s.low:.2f}-{s.high:.2f} over {s.prompts} prompts"
    if s.verdict == "separates":
        return f"{metric} tells the distilled students from the independent models ({span})."
    if s.verdict == "reversed":
        return (f"{metric} points the wrong way: the independent models score closer to the teacher than the "
                f"distilled students ({span}).")
    return (f"{metric} cannot tell the distilled students from the independent models: the interval contains 0.5 "
            f"({span}).")
