"""Teacher-mixed sampling filters each model's distribution, then mixes (issue 29), as MiniLLM's fork of
transformers does: microsoft/LMOps ``dpkd/transformers/src/transformers/generation/utils.py:2940-2943`` (the
student's ``softmax(warp(logits))``), ``:2991-2997`` (the teacher's, then ``probs = (1 - alpha) * probs + alpha *
m_probs``), the token drawn from that mixture with no further filter."""

from __future__ import annotations

import math

import pytest
import torch

from lmdistill.generation import SamplingConfig, generate
from lmdistill.generation.noise import NoiseSource, key_from
from lmdistill.generation.policies.teacher_mix import mixture_log_probs, mixture_logits
from lmdistill.generation.sampling import filter_logits

FILTERED = dict(temperature=0.8, top_k=12, top_p=0.7)
FILTERED_ALPHA = 0.3


def brute_filter(logits: list[float], t: float, top_k: int, top_p: float) -> list[float]:
    """One model's filtered distribution in float64, by hand: ``softmax(x / T)`` over the ids kept by top-k (the
    k largest) and then top-p (the smallest prefix of the remaining ids, most probable first, whose renormalised
    mass reaches top_p), renormalised; 0 elsewhere."""
    x = [v / t for v in logits]
    kept = sorted(range(len(x)), key=lambda i: -x[i])[:top_k or len(x)]
    z = sum(math.exp(x[i]) for i in kept)
    nucleus, mass = [], 0.0
    for i in kept:
        nucleus.append(i)
        mass += math.exp(x[i]) / z
        if mass >= top_p:
            break
    z = sum(math.exp(x[i]) for i in nucleus)
    return [math.exp(x[i]) / z if i in nucleus else 0.0 for i in range(len(x))]


def brute_mixture(q: list[float], p: list[float], cfg: SamplingConfig, alpha: float) -> list[float]:
    qs = brute_filter(q, cfg.temperature, cfg.top_k, cfg.top_p)
    ps = brute_filter(p, cfg.temperature, cfg.top_k, cfg.top_p)
    a = alpha
    return [a * pi + (1 - a) * qi for pi, qi in zip(ps, qs)]


@pytest.mark.parametrize("cfg,alpha", [(dict(FILTERED), FILTERED_ALPHA),
                                       (dict(temperature=1.3, top_k=0, top_p=0.5), 0.2),
                                       (dict(temperature=0.7, top_k=5, top_p=1.0), 0.6)])
def test_mixture_equals_brute_force_filter_then_mix(cfg, alpha):
    config = SamplingConfig(**cfg)
    g = torch.Generator().manual_seed(0)
    q, p = 2 * torch.randn(5, 40, generator=g, dtype=torch.float64), 2 * torch.randn(5, 40, generator=g,
                                                                                   dtype=torch.float64)
    ours = mixture_log_probs(q, p, config, alpha).exp()
    ref = torch.tensor([brute_mixture(a.tolist(), b.tolist(), config, alpha) for a, b in zip(q, p)],
                       dtype=torch.float64)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    assert ours.sum(-1).sub(1).abs().max() < 1e-12
    # the order matters: filtering the mixture (the code before issue 29) gives another distribution
    old = filter_logits(mixture_logits(q / config.temperature, p / config.temperature, alpha),
                        config.top_k, config.top_p).softmax(-1)
    assert (old - ref).abs().max() > 1e-3


def reference_tokens(student, teacher, prompt, n, cfg, alpha, key, eos, vocab, *, old_order=False):
    """No cache, one row, full forwards: the float64 filter-then-mix mixture plus the engine's Gumbel noise
    (``old_order``: the code before issue 29 in float32, the mixture of the unfiltered distributions, filtered)."""
    noise, out = NoiseSource([key], vocab), []
    while len(out) < n:
        ids = torch.tensor([prompt + out])
        with torch.no_grad():
            q, p = student(input_ids=ids).logits[0, -1, :vocab], teacher(input_ids=ids).logits[0, -1, :vocab]
        gumbel = noise.gumbel(len(out))[0]
        if old_order:
            t = cfg.divergence_temperature
            mix = filter_logits(mixture_logits(q / t, p / t, alpha), cfg.top_k, cfg.top_p)
        else:
            mix = torch.tensor(brute_mixture(q.double().tolist(), p.double().tolist(), cfg, alpha),
                               dtype=torch.float64).log()
        tok = int(mix.argmax()) if cfg.greedy else int((mix + gumbel.to(mix.dtype)).argmax())
        out.append(tok)
        if tok == eos:
            break
    return out


def _run(models, tokenizer, prompts, keys, alpha, **cfg):
    config = SamplingConfig(max_new_tokens=8, **cfg)
    return generate(models["student"], prompts, "teacher_mix", teacher=models["teacher"], config=config,
                    params={"alpha": alpha}, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                    row_keys=keys), config


def test_policy_draws_from_the_filtered_mixture(models, tokenizer, prompts):
    """End to end with top-k and top-p active: each row's tokens are those of a float64 brute-force
    filter-then-mix with the same noise; the old order (filter the mixture) writes other tokens."""
    vocab = min(models[m].get_output_embeddings().weight.shape[0] for m in ("student", "teacher"))
    differs = 0
    for seed in (3, 4):
        keys = [key_from(seed, i) for i in range(len(prompts))]
        out, cfg = _run(models, tokenizer, prompts, keys, FILTERED_ALPHA, **FILTERED)
        for b, p in enumerate(prompts):
            args = (models["student"], models["teacher"], p, 8, cfg, FILTERED_ALPHA, keys[b], tokenizer.eos_token_id,
                    vocab)
            assert out.responses[b] == reference_tokens(*args)
            differs += out.responses[b] != reference_tokens(*args, old_order=True)
    assert differs > 0


@pytest.mark.parametrize("cfg,alpha", [(dict(), 0.2), (dict(temperature=0.7), 0.5), (dict(do_sample=False), 0.2)])
def test_unfiltered_tokens_are_unchanged(models, tokenizer, prompts, cfg, alpha):
    """Top-k 0, top-p 1 (the MiniLLM recipe): the same tokens, for a fixed seed, as the code before issue 29, whose
    order (mix, then filter) is replayed uncached in float32 with the same operations."""
    vocab = min(models[m].get_output_embeddings().weight.shape[0] for m in ("student", "teacher"))
    for seed in (1, 2, 5):
        keys = [key_from(seed, i) for i in range(len(prompts))]
        out, config = _run(models, tokenizer, prompts, keys, alpha, **cfg)
        for b, p in enumerate(prompts):
            assert out.responses[b] == reference_tokens(models["student"], models["teacher"], p, 8, config, alpha,
                                                        keys[b], tokenizer.eos_token_id, vocab, old_order=True)
        again, _ = _run(models, tokenizer, prompts, keys, alpha, **cfg)
        assert again.responses == out.responses
