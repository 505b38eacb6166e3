"""``no_repeat_ngram_size``: the batched ban against transformers' ``NoRepeatNGramLogitsProcessor``, in every policy
and both decoders, and against ``model.generate``.

The MiniLLM/DistiLLM evaluation decodes with ``no_repeat_ngram_size=6`` (LMOps ``minillm/arguments.py:180`` default,
passed to ``GenerationConfig`` at ``minillm/evaluate_main.py:61``; distillm ``arguments.py:203``,
``evaluate_main.py:50``), i.e. transformers' processor, which is the reference every test here compares with.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (LogitsProcessorList, NoRepeatNGramLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from lmdistill.generation import CORRECTED, SamplingConfig, generate
from lmdistill.generation.engine import pad_left
from lmdistill.generation.noise import NoiseSource, key_from
from lmdistill.generation.policies.switch import SwitchParams
from lmdistill.generation.sampling import NgramBan, ban_ngrams, banned_ngram_mask, pick, scaled_logits
from lmdistill.losses import per_token_divergence


def hf_ban(context: list[int], logits: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' processor on one unpadded row (``logits`` ``[V]``)."""
    ids = torch.tensor([context], dtype=torch.long)
    return NoRepeatNGramLogitsProcessor(n)(ids, logits[None].clone())[0]


def repeated_ngrams(prompt: list[int], response: list[int], n: int) -> list[int]:
    """Response positions t whose n-gram (ending at t, over prompt + response) already occurred earlier."""
    ctx = prompt + response
    bad = []
    for t in range(len(response)):
        end = len(prompt) + t + 1
        if end < n:
            continue
        gram = tuple(ctx[end - n:end])
        if any(tuple(ctx[i:i + n]) == gram for i in range(0, end - n)):
            bad.append(t)
    return bad


# ---------------------------------------------------------------- the mask against the processor

rows_strategy = st.integers(1, 4).flatmap(lambda b: st.tuples(
    st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=24), min_size=b, max_size=b),
    st.integers(1, 6), st.integers(0, 2**31 - 1)))


@settings(max_examples=300, deadline=None)
@given(rows_strategy)
def test_mask_equals_transformers_on_equal_length_rows(case):
    rows, n, seed = case
    width = min(len(r) for r in rows)
    ids = torch.tensor([r[:width] for r in rows], dtype=torch.long).reshape(len(rows), width)
    scores = torch.randn(len(rows), 7, generator=torch.Generator().manual_seed(seed))
    ref = NoRepeatNGramLogitsProcessor(n)(ids, scores.clone())
    assert torch.equal(ban_ngrams(scores, ids, None, n), ref)


@settings(max_examples=300, deadline=None)
@given(rows_strategy, st.integers(0, 9))
def test_left_padding_is_not_part_of_the_context(case, pad_id):
    """A left-padded batch bans, row by row, what the processor bans on the unpadded row (the pad id may be a
    token of the vocabulary: the padding must not count)."""
    rows, n, seed = case
    rows = [r or [1] for r in rows]
    ids, mask = pad_left(rows, pad_id)
    scores = torch.randn(len(rows), 10, generator=torch.Generator().manual_seed(seed))
    start = ids.shape[1] - mask.sum(1)
    ours = ban_ngrams(scores, ids, start, n)
    for b, r in enumerate(rows):
        assert torch.equal(ours[b], hf_ban(r, scores[b], n))
    # the stateful helper the decoders use: prompt + response so far, rows re-ordered
    resp = torch.randint(0, 6, (len(rows), 5), generator=torch.Generator().manual_seed(seed + 1))
    ban = NgramBan(ids, mask, n, 10)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 2))
    moved = ban.select(perm)
    for t in range(resp.shape[1] + 1):
        got = moved.mask(resp[perm][:, :t])
        for i, b in enumerate(perm.tolist()):
            ref = hf_ban(rows[b] + resp[b, :t].tolist(), scores[b], n)
            assert torch.equal(got[i], torch.isinf(ref))


def test_ids_outside_the_sampled_vocabulary_are_ignored():
    ctx = torch.tensor([[7, 9, 7, 3, 7]])  # after 7: 9 and 3 were seen; 9 is outside a vocab of 8
    assert banned_ngram_mask(ctx, None, 2, 8).nonzero()[:, 1].tolist() == [3]
    assert not banned_ngram_mask(ctx, None, 0, 8).any()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8), (0.5, 4, 0.6)])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_ban_comes_before_temperature_top_k_and_top_p(temperature, top_k, top_p, n):
    """``scaled_logits(..., banned)`` is transformers' processor list: the ban, then the warpers."""
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 6, (5, 12), generator=g)
    scores = torch.randn(5, 9, generator=g)
    procs = [NoRepeatNGramLogitsProcessor(n), TemperatureLogitsWarper(temperature)]
    procs += [TopKLogitsWarper(top_k)] if top_k else []
    procs += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    ref = LogitsProcessorList(procs)(ids, scores.clone())
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = scaled_logits(scores, cfg, banned_ngram_mask(ids, None, n, 9))
    torch.testing.assert_close(ours, ref)
    greedy = pick(scores, SamplingConfig(do_sample=False), None, banned=banned_ngram_mask(ids, None, n, 9))
    assert torch.equal(greedy, NoRepeatNGramLogitsProcessor(n)(ids, scores.clone()).argmax(-1))


# ---------------------------------------------------------------- end to end on the micro models

def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def run(models, tokenizer, prompts, policy, params=None, **cfg):
    """``policy`` with its ``params`` (a mapping of the policy's fields) and the sampling settings ``cfg``."""
    cfg.setdefault("max_new_tokens", 16)
    cfg.setdefault("seed", 7)
    eos = cfg.pop("eos_id", tokenizer.eos_token_id)
    keys = cfg.pop("row_keys", None)
    return generate(models["student"], prompts, policy, teacher=models["teacher"], config=SamplingConfig(**cfg),
                    params=params, pad_id=tokenizer.pad_token_id, eos_id=eos, row_keys=keys)


def reference_sample(model, prompt, n_new, cfg, key, eos, vocab):
    """One row, no cache, a full forward per step, transformers' processor for the ban, the engine's noise."""
    noise = NoiseSource([key], vocab)
    out: list[int] = []
    while len(out) < n_new:
        logits = hf_ban(prompt + out, full_logits(model, prompt + out)[-1, :vocab], cfg.no_repeat_ngram_size)
        tok = int(pick(logits[None], cfg, None if cfg.greedy else noise.gumbel(len(out)))[0])
        out.append(tok)
        if tok == eos:
            break
    return out


@pytest.mark.parametrize("decoder", ["fast", "hf"])
@pytest.mark.parametrize("cfg", [dict(do_sample=False), dict(temperature=0.5, top_k=2, top_p=0.95)])
@pytest.mark.parametrize("ngram", [2, 6])
def test_student_matches_uncached_reference_with_the_processor(models, tokenizer, prompts, decoder, cfg, ngram):
    """Cached, batched, left-padded decoding with rows leaving the batch at their EOS = the brute-force loop."""
    keys = [key_from(5, i) for i in range(len(prompts))]
    vocab = models["student"].config.vocab_size
    free = run(models, tokenizer, prompts, "student", eos_id=None, row_keys=keys, no_repeat_ngram_size=ngram,
               decoder=decoder, **cfg)
    row0 = free.responses[0]
    eos = next(tok for i, tok in enumerate(row0) if i >= 2 and tok not in row0[:i])  # row 0 ends early
    out = run(models, tokenizer, prompts, "student", eos_id=eos, row_keys=keys, no_repeat_ngram_size=ngram,
              decoder=decoder, **cfg)
    config = SamplingConfig(max_new_tokens=16, no_repeat_ngram_size=ngram, **cfg)
    assert len(out.responses[0]) < 16
    for b, p in enumerate(prompts):
        assert out.responses[b] == reference_sample(models["student"], p, 16, config, keys[b], eos, vocab)


@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(temperature=0.5, top_k=2)])
def test_the_ban_bites_on_the_micro_model(models, tokenizer, prompts, sampling):
    """Without the ban, greedy and low-temperature sampling repeat n-grams here, so the tests below test something."""
    for n in (2, 6):
        out = run(models, tokenizer, prompts, "student", max_new_tokens=24 if n == 2 else 32, **sampling)
        assert any(repeated_ngrams(p, r, n) for p, r in zip(prompts, out.responses)), n


POLICIES = ["student", "teacher", "switch", "scrg", "teacher_mix", "mixed"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("decoder", ["fast", "hf"])
@pytest.mark.parametrize("greedy", [True, False])
def test_no_policy_repeats_an_ngram(models, tokenizer, prompts, policy, decoder, greedy):
    params = dict(tau0=0.0) if policy == "switch" else dict(student_prob=0.5, coin="sequence") \
        if policy == "mixed" else None
    sampling = dict(do_sample=False) if greedy else dict(temperature=0.5, top_k=2)  # repeats without a ban
    for n in (2, 6):
        out = run(models, tokenizer, prompts, policy, no_repeat_ngram_size=n, decoder=decoder,
                  max_new_tokens=24 if n == 2 else 32, params=params, **sampling)
        for p, r in zip(prompts, out.responses):
            assert repeated_ngrams(p, r, n) == [], (policy, n)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("n", [2, 6])
def test_fast_and_hf_decoders_agree_greedy(models, tokenizer, prompts, policy, n):
    kw = dict(do_sample=False, no_repeat_ngram_size=n, max_new_tokens=24)
    fast = run(models, tokenizer, prompts, policy, decoder="fast", **kw)
    hf = run(models, tokenizer, prompts, policy, decoder="hf", **kw)
    assert fast.responses == hf.responses
    assert torch.equal(fast.sources, hf.sources)


@pytest.mark.parametrize("decoder", ["fast", "hf"])
def test_greedy_equals_transformers_generate(models, tokenizer, prompts, decoder):
    """``model.generate(do_sample=False, no_repeat_ngram_size=2)`` on each unpadded prompt = our batched greedy."""
    model = models["student"]
    n_new = 20
    ours = run(models, tokenizer, prompts, "student", do_sample=False, no_repeat_ngram_size=2, max_new_tokens=n_new,
               decoder=decoder)
    for b, p in enumerate(prompts):
        with torch.no_grad():
            seq = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 do_sample=False, num_beams=1, no_repeat_ngram_size=2, max_new_tokens=n_new,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 temperature=None, top_p=None, top_k=None)
        assert ours.responses[b] == seq[0, len(p):].tolist()


def test_switch_samples_banned_but_measures_unbanned_jsd(models, tokenizer, prompts):
    """Brute force: the JSD of the two models' full (unbanned) distributions decides, the writer's banned
    distribution is drawn from."""
    probe = run(models, tokenizer, prompts, "switch", params={"tau0": math.inf}, max_new_tokens=16, temperature=0.5,
                top_k=2)
    values = sorted(x for s in probe.stats for x in s["jsd"])
    tau0 = values[len(values) // 2]
    keys = [key_from(9, i) for i in range(len(prompts))]
    cfg = SamplingConfig(max_new_tokens=16, no_repeat_ngram_size=2, temperature=0.5, top_k=2)
    params = SwitchParams(tau0=tau0, decay=0.05)
    out = generate(models["student"], prompts, "switch", teacher=models["teacher"], config=cfg, params=params,
                   pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, row_keys=keys)
    vocab = models["student"].config.vocab_size
    for b, p in enumerate(prompts):
        noise = NoiseSource([keys[b]], vocab)
        toks, trace = [], []
        while len(toks) < 16:
            q = full_logits(models["student"], p + toks)[-1]
            t = full_logits(models["teacher"], p + toks)[-1]
            d = per_token_divergence("jsd", q[None], t[None], temperature=0.5, beta=0.5)[0].item()
            writer = t if d > params.threshold(len(toks)) else q
            toks.append(int(pick(hf_ban(p + toks, writer, 2)[None], cfg, noise.gumbel(len(toks)))[0]))
            trace.append(d)
            if toks[-1] == tokenizer.eos_token_id:
                break
        assert out.responses[b] == toks
        assert out.stats[b]["jsd"] == pytest.approx(trace, rel=1e-4, abs=1e-7)


def test_scrg_corrects_to_the_teachers_best_allowed_token(models, tokenizer, prompts):
    cfg = dict(no_repeat_ngram_size=2, max_new_tokens=16)
    out = run(models, tokenizer, prompts, "scrg", params={"rounds": 2}, **cfg)
    corrected = 0
    for b, p in enumerate(prompts):
        r = out.responses[b]
        assert repeated_ngrams(p, r, 2) == []
        for j in (out.sources[b] == CORRECTED).nonzero().flatten().tolist():
            p_j = full_logits(models["teacher"], p + r[:j])[-1]
            assert r[j] == int(hf_ban(p + r[:j], p_j, 2).argmax())
            corrected += 1
    assert corrected, "the test needs a correction"


def test_validation_decodes_with_the_protocol_ban():
    from lmdistill.evaluate.run import EvalSettings
    from lmdistill.train.validation import validation_sampling

    cfg = validation_sampling(64)
    assert cfg.no_repeat_ngram_size == EvalSettings().no_repeat_ngram_size == 6
    assert cfg == EvalSettings(max_new_tokens=64).sampling()
