"""The sequence engine: cache correctness, sampling, policies against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

from lmdistill.errors import ConfigError
from lmdistill.generation import SamplingConfig, generate
from lmdistill.generation.engine import pad_left
from lmdistill.generation.noise import NoiseSource, key_from, step_seed
from lmdistill.generation.policies.mixed import MixedParams
from lmdistill.generation.policies.scrg import ScrgParams
from lmdistill.generation.policies.switch import SwitchParams
from lmdistill.generation.runner import CachedLM
from lmdistill.generation.sampling import filter_logits, pick
from lmdistill.losses import per_token_divergence


def run(models, tokenizer, prompts, policy, student="student", teacher="teacher", params=None, **cfg):
    """``policy`` with the policy's ``params`` (a mapping of its fields) and the sampling settings ``cfg``."""
    cfg.setdefault("max_new_tokens", 12)
    cfg.setdefault("seed", 7)
    eos = cfg.pop("eos_id", tokenizer.eos_token_id)
    gold = cfg.pop("gold", None)
    return generate(models[student], prompts, policy, teacher=models[teacher] if teacher else None, gold=gold,
                    config=SamplingConfig(**cfg), params=params, pad_id=tokenizer.pad_token_id, eos_id=eos)


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


# ---------------------------------------------------------------- cache correctness

def test_cached_steps_equal_full_forward_with_left_padding(models, prompts):
    model = models["teacher"]
    ids, mask = pad_left(prompts, 0)
    assert (mask == 0).any(), "the batch must contain left padding"
    g = torch.Generator().manual_seed(0)
    resp = torch.randint(10, 4000, (len(prompts), 6), generator=g)
    lm = CachedLM(model, ids, mask, max_new_tokens=6)
    with torch.no_grad():
        steps = [lm.prefill()] + [lm.step(resp[:, t]) for t in range(5)]
    steps = torch.stack(steps, 1)  # [B, 6, V]: position t predicts response token t
    for b, p in enumerate(prompts):
        ref = full_logits(model, p + resp[b].tolist())[len(p) - 1:len(p) + 5]
        torch.testing.assert_close(steps[b], ref, atol=1e-5, rtol=1e-4)


def test_score_crop_and_extend_equal_full_forward(models, prompts):
    model = models["student"]
    ids, mask = pad_left(prompts, 0)
    resp = torch.randint(10, 4000, (len(prompts), 7), generator=torch.Generator().manual_seed(1))
    lm = CachedLM(model, ids, mask, max_new_tokens=7)
    with torch.no_grad():
        scored = lm.score(resp)
        assert lm.fed == 6
        lm.crop(2)
        resp2 = resp.clone()
        resp2[:, 2:] = torch.randint(10, 4000, (len(prompts), 5), generator=torch.Generator().manual_seed(2))
        extended = lm.extend(resp2[:, 2:6])  # predicts tokens 3..6
    for b, p in enumerate(prompts):
        torch.testing.assert_close(scored[b], full_logits(model, p + resp[b].tolist())[len(p) - 1:len(p) + 6],
                                   atol=1e-5, rtol=1e-4)
        ref2 = full_logits(model, p + resp2[b].tolist())[len(p) + 2:len(p) + 6]
        torch.testing.assert_close(extended[b], ref2, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError):
        lm.crop(99)


# ---------------------------------------------------------------- noise and sampling

def test_noise_is_deterministic_uniform_and_per_row():
    seeds = {step_seed(k, s, t) for k in range(20) for s in range(3) for t in range(50)}
    assert len(seeds) == 20 * 3 * 50 and all(0 <= x < 2**63 for x in seeds)
    noise = NoiseSource([key_from(0, i) for i in range(64)], vocab=1000)
    u = noise.uniform(3)
    assert torch.equal(u, noise.uniform(3)) and not torch.equal(u, noise.uniform(4))
    assert not torch.equal(u, noise.uniform(3, stream=1))
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert (counts - u.numel() / 10).abs().max() < 5 * math.sqrt(u.numel() / 10)
    # rows are independent of each other, and a row's noise does not depend on the rest of the batch
    assert abs(torch.corrcoef(u[:8])[0, 1:].abs().max().item()) < 0.15
    assert torch.equal(noise.select([5, 2]).uniform(3), u[[5, 2]])
    assert torch.isfinite(noise.gumbel(0)).all()


def test_gumbel_max_samples_the_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    rows = 20000
    noise = NoiseSource(list(range(rows)), vocab=5)
    cfg = SamplingConfig(temperature=0.7)
    tokens = pick(logits.expand(rows, 5), cfg, noise.gumbel(0))
    freq = torch.bincount(tokens, minlength=5).float() / rows
    expected = torch.softmax(logits / 0.7, -1)
    assert (freq - expected).abs().max() < 4 * math.sqrt(0.25 / rows)


def test_top_k_and_top_p_filters_match_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 30, generator=g)
    out = filter_logits(logits, top_k=4)
    for row, ref in zip(out, logits):
        kept = set(torch.isfinite(row).nonzero().flatten().tolist())
        assert kept == set(ref.topk(4).indices.tolist())
    for top_p in (0.05, 0.5, 0.9, 0.999):
        out = filter_logits(logits, top_p=top_p)
        for row, ref in zip(out, logits):
            probs = ref.softmax(-1)
            order = probs.argsort(descending=True).tolist()
            kept, mass = set(), 0.0
            for i in order:  # smallest prefix of the sorted ids whose mass reaches top_p
                kept.add(i)
                mass += probs[i].item()
                if mass >= top_p:
                    break
            assert set(torch.isfinite(row).nonzero().flatten().tolist()) == kept
    both = filter_logits(logits, top_k=3, top_p=0.999)
    assert (torch.isfinite(both).sum(-1) <= 3).all()


def test_top_k_one_equals_greedy(models, tokenizer, prompts):
    a = run(models, tokenizer, prompts, "student", top_k=1, seed=1)
    b = run(models, tokenizer, prompts, "student", do_sample=False)
    assert a.responses == b.responses


# ---------------------------------------------------------------- the student loop against a brute-force reference

def reference_sample(model, prompt, n, cfg, key, eos, stream=0, forced=(), vocab=None):
    """No cache, one row, a full forward per step; same noise as the engine."""
    noise = NoiseSource([key], vocab or model.config.vocab_size)
    out = list(forced)
    while len(out) < n:
        logits = full_logits(model, prompt + out)[-1:, :noise.vocab]
        tok = int(pick(logits, cfg, None if cfg.greedy else noise.gumbel(len(out), stream))[0])
        out.append(tok)
        if tok == eos:
            break
    return out


@pytest.mark.parametrize("cfg", [dict(), dict(temperature=0.8, top_k=50, top_p=0.9)])
def test_student_matches_uncached_reference(models, tokenizer, prompts, cfg):
    keys = [key_from(3, i) for i in range(len(prompts))]
    config = SamplingConfig(max_new_tokens=10, **cfg)
    out = generate(models["student"], prompts, "student", config=config, pad_id=tokenizer.pad_token_id,
                   eos_id=tokenizer.eos_token_id, row_keys=keys)
    for b, p in enumerate(prompts):
        assert out.responses[b] == reference_sample(models["student"], p, 10, config, keys[b], tokenizer.eos_token_id)


def test_same_seed_same_output_and_batch_independence(models, tokenizer, prompts):
    a = run(models, tokenizer, prompts, "student", seed=11)
    b = run(models, tokenizer, prompts, "student", seed=11)
    c = run(models, tokenizer, prompts, "student", seed=12)
    assert a.responses == b.responses and torch.equal(a.input_ids, b.input_ids)
    assert a.responses != c.responses
    keys = [key_from(0, i) for i in range(len(prompts))]
    kw = dict(config=SamplingConfig(max_new_tokens=12), pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    whole = generate(models["student"], prompts, "student", row_keys=keys, **kw)
    alone = generate(models["student"], prompts[2:3], "student", row_keys=keys[2:3], **kw)
    assert alone.responses[0] == whole.responses[2]


def test_eos_and_padding_per_row(models, tokenizer, prompts):
    free = run(models, tokenizer, prompts, "student", eos_id=None, max_new_tokens=12, seed=5)
    assert all(len(r) == 12 for r in free.responses)
    row0 = free.responses[0]
    eos = next(tok for i, tok in enumerate(row0) if i >= 2 and tok not in row0[:i])
    stop = row0.index(eos)
    out = run(models, tokenizer, prompts, "student", eos_id=eos, max_new_tokens=12, seed=5)
    n = out.input_ids.shape[1] - out.prompt_width
    for b, full in enumerate(free.responses):
        end = full.index(eos) + 1 if eos in full else 12
        assert out.responses[b] == full[:end]
        assert out.stats[b]["length"] == end and out.stats[b]["finished"] == (eos in full)
        resp = out.input_ids[b, out.prompt_width:]
        assert resp[:end].tolist() == full[:end]
        assert (resp[end:] == tokenizer.pad_token_id).all()
        assert out.attention_mask[b, out.prompt_width:].tolist() == [1] * end + [0] * (n - end)
        assert out.loss_mask[b].tolist() == [0] * out.prompt_width + [1] * end + [0] * (n - end)
        assert out.sources[b].tolist() == [0] * end + [-1] * (n - end)
    assert out.responses[0] == row0[:stop + 1]
    # left-padded prompts, one column where every response starts
    for b, p in enumerate(prompts):
        w = out.prompt_width
        assert out.input_ids[b, w - len(p):w].tolist() == p
        assert out.attention_mask[b, :w].tolist() == [0] * (w - len(p)) + [1] * len(p)


# ---------------------------------------------------------------- switch

def test_switch_extremes_reproduce_student_and_teacher(models, tokenizer, prompts):
    student = run(models, tokenizer, prompts, "student", seed=3)
    teacher = run(models, tokenizer, prompts, "teacher", seed=3)
    never = run(models, tokenizer, prompts, "switch", seed=3, params={"tau0": math.inf})
    always = run(models, tokenizer, prompts, "switch", seed=3, params={"tau0": -1.0})
    assert never.responses == student.responses
    assert always.responses == teacher.responses
    assert torch.equal(never.sources, student.sources) and torch.equal(always.sources, teacher.sources)
    assert all(s["teacher_fraction"] == 0.0 for s in never.stats)
    assert all(s["teacher_fraction"] == 1.0 for s in always.stats)


def test_switch_with_padded_student_vocab(models, tokenizer, prompts):
    cfg = dict(seed=4, vocab_size=len(tokenizer))
    s = run(models, tokenizer, prompts, "student", student="padded_student", teacher=None, **cfg)
    never = run(models, tokenizer, prompts, "switch", student="padded_student", params={"tau0": math.inf},
                **cfg)
    assert never.responses == s.responses
    mixed = run(models, tokenizer, prompts, "switch", student="padded_student", seed=4, params={"tau0": -1})
    assert all(t < len(tokenizer) for r in mixed.responses for t in r)


def reference_switch(student, teacher, prompt, n, cfg, params, key, eos):
    noise = NoiseSource([key], student.config.vocab_size)
    out, src, trace = [], [], []
    while len(out) < n:
        q = full_logits(student, prompt + out)[-1:]
        p = full_logits(teacher, prompt + out)[-1:]
        d = per_token_divergence("jsd", q, p, temperature=cfg.divergence_temperature, beta=0.5)[0].item()
        use_teacher = d > params.tau0 * math.exp(-params.decay * len(out))
        g = noise.gumbel(len(out))
        out.append(int(pick(p if use_teacher else q, cfg, g)[0]))
        src.append(int(use_teacher))
        trace.append(d)
        if out[-1] == eos:
            break
    return out, src, trace


def test_switch_matches_uncached_reference(models, tokenizer, prompts):
    probe = run(models, tokenizer, prompts, "switch", params={"tau0": math.inf}, max_new_tokens=10)
    values = sorted(x for s in probe.stats for x in s["jsd"])
    tau0 = values[len(values) // 2]  # about half of the steps above threshold at t = 0
    keys = [key_from(9, i) for i in range(len(prompts))]
    cfg = SamplingConfig(max_new_tokens=10)
    params = SwitchParams(tau0=tau0, decay=0.05)
    out = generate(models["student"], prompts, "switch", teacher=models["teacher"], config=cfg, params=params,
                   pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, row_keys=keys)
    seen = set()
    for b, p in enumerate(prompts):
        toks, src, trace = reference_switch(models["student"], models["teacher"], p, 10, cfg, params, keys[b],
                                            tokenizer.eos_token_id)
        assert out.responses[b] == toks
        assert out.sources[b, :len(toks)].tolist() == src
        assert out.stats[b]["jsd"] == pytest.approx(trace, rel=1e-4, abs=1e-7)
        assert out.stats[b]["teacher_fraction"] == pytest.approx(sum(src) / len(src))
        seen.update(src)
    assert seen == {0, 1}, "the test needs both student and teacher tokens"


# ---------------------------------------------------------------- scrg

def candidate_kls(student, teacher, prompt, response) -> dict[int, tuple[float, int]]:
    """Every position where the response's token is not the teacher's argmax: KL(teacher || student) there (float64
    full forwards) and the teacher's argmax."""
    q = full_logits(student, prompt + response)[len(prompt) - 1:len(prompt) - 1 + len(response)].double()
    p = full_logits(teacher, prompt + response)[len(prompt) - 1:len(prompt) - 1 + len(response)].double()
    out = {}
    for t, tok in enumerate(response):
        top = int(p[t].argmax())
        if tok != top:
            out[t] = ((p[t].log_softmax(-1).exp() * (p[t].log_softmax(-1) - q[t].log_softmax(-1))).sum().item(), top)
    return out


def brute_force_error_position(student, teacher, prompt, response, temperature=1.0, chosen=None, rtol=1e-4):
    """The position of largest KL among the candidates and the teacher's token there. Random micro models give
    near-uniform distributions whose KLs can tie to 1e-5 (relative); float32 rounding then decides which wins,
    so ``chosen`` (the implementation's pick) is accepted when its KL is within ``rtol`` of the largest."""
    cands = candidate_kls(student, teacher, prompt, response)
    if not cands:
        return None, None
    best = max(cands, key=lambda t: (cands[t][0], -t))
    if chosen in cands and cands[chosen][0] >= cands[best][0] * (1 - rtol):
        best = chosen
    return best, cands[best][1]


def test_scrg_correction_matches_brute_force(models, tokenizer, prompts):
    keys = [key_from(1, i) for i in range(len(prompts))]
    kw = dict(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, row_keys=keys)
    cfg = SamplingConfig(max_new_tokens=12)
    plain = generate(models["student"], prompts, "student", config=cfg, **kw)
    out = generate(models["student"], prompts, "scrg", teacher=models["teacher"], config=cfg, params={"rounds": 1},
                   **kw)
    for b, p in enumerate(prompts):
        y = plain.responses[b]
        chosen = out.stats[b]["correction_positions"][0] if out.stats[b]["correction_positions"] else None
        j, fix = brute_force_error_position(models["student"], models["teacher"], p, y, chosen=chosen)
        assert j is not None
        assert out.stats[b]["correction_positions"] == [j]
        new = out.responses[b]
        assert new[:j] == y[:j] and new[j] == fix
        # the suffix is the student's own continuation of the corrected prefix (noise stream 1)
        assert new == reference_sample(models["student"], p, 12, cfg, keys[b], tokenizer.eos_token_id, stream=1,
                                       forced=y[:j] + [fix])
        assert out.stats[b]["regenerated_tokens"] == len(new) - j - 1
        assert out.sources[b, :len(new)].tolist() == [0] * j + [2] + [0] * (len(new) - j - 1)


def reference_scrg(student, teacher, prompt, cfg, rounds, key, eos, chosen=()):
    """SCRG one row at a time with full forwards; returns (response, correction positions). ``chosen``: the
    implementation's positions, accepted round by round where they tie the largest KL (brute_force_error_position)."""
    y = reference_sample(student, prompt, cfg.max_new_tokens, cfg, key, eos)
    positions = []
    for rnd in range(1, rounds + 1):
        j, fix = brute_force_error_position(student, teacher, prompt, y,
                                            chosen=chosen[rnd - 1] if rnd <= len(chosen) else None)
        if j is None:
            break
        positions.append(j)
        y = reference_sample(student, prompt, cfg.max_new_tokens, cfg, key, eos, stream=rnd, forced=y[:j] + [fix])
    return y, positions


@pytest.mark.parametrize("with_eos", [False, True])
def test_scrg_several_rounds_match_brute_force(models, tokenizer, prompts, with_eos):
    keys = [key_from(2, i) for i in range(len(prompts))]
    cfg, rounds = SamplingConfig(max_new_tokens=10), 3
    kw = dict(config=cfg, pad_id=tokenizer.pad_token_id, row_keys=keys)
    eos = tokenizer.eos_token_id
    if with_eos:  # an EOS id the student samples, so first drafts end early and corrections re-open them
        free = generate(models["student"], prompts, "student", eos_id=None, **kw).responses
        eos = next(t for i, t in enumerate(free[0]) if i >= 2 and t not in free[0][:i])
        first = generate(models["student"], prompts, "student", eos_id=eos, **kw)
        assert first.stats[0]["finished"] and first.stats[0]["length"] < 10
    out = generate(models["student"], prompts, "scrg", teacher=models["teacher"], eos_id=eos, params={"rounds": rounds},
                   **kw)
    for b, p in enumerate(prompts):
        y, positions = reference_scrg(models["student"], models["teacher"], p, cfg, rounds, keys[b], eos,
                                      chosen=out.stats[b]["correction_positions"])
        assert out.responses[b] == y
        assert out.stats[b]["correction_positions"] == positions
        assert out.stats[b]["finished"] == (y[-1] == eos)


def test_scrg_with_padded_vocab(models, tokenizer, prompts):
    cfg = dict(seed=6)
    out = run(models, tokenizer, prompts, "scrg", student="padded_student", params={"rounds": 2}, **cfg)
    assert all(t < len(tokenizer) for r in out.responses for t in r)
    assert all(s["correction_positions"] for s in out.stats)
    zero = run(models, tokenizer, prompts, "scrg", student="padded_student", params={"rounds": 0}, **cfg)
    ref = run(models, tokenizer, prompts, "student", student="padded_student", teacher=None, seed=6,
              vocab_size=len(tokenizer))
    assert zero.responses == ref.responses


def test_scrg_without_candidates_keeps_the_response(models, tokenizer, prompts):
    # teacher == student and greedy: every sampled token is the teacher's argmax
    out = run(models, tokenizer, prompts, "scrg", teacher="student", do_sample=False, params={"rounds": 2})
    ref = run(models, tokenizer, prompts, "student", teacher=None, do_sample=False)
    assert out.responses == ref.responses
    assert all(s["correction_positions"] == [] and s["regenerated_tokens"] == 0 for s in out.stats)
    zero = run(models, tokenizer, prompts, "scrg", params={"rounds": 0}, seed=8)
    assert zero.responses == run(models, tokenizer, prompts, "student", seed=8).responses


# ---------------------------------------------------------------- mixed

def test_mixed_policy(models, tokenizer, prompts):
    gold = [[5, 6, 7, tokenizer.eos_token_id], [8] * 30, None, [9, tokenizer.eos_token_id]]
    student = run(models, tokenizer, prompts, "student", seed=2)
    teacher = run(models, tokenizer, prompts, "teacher", seed=2)
    assert run(models, tokenizer, prompts, "mixed", seed=2, params={"student_prob": 1.0}, gold=gold).responses \
        == student.responses
    off = run(models, tokenizer, prompts, "mixed", seed=2, params={"student_prob": 0.0}, gold=gold)
    assert off.responses[0] == gold[0] and off.responses[1] == [8] * 30 and off.responses[3] == gold[3]  # gold kept whole
    assert off.responses[2] == teacher.responses[2]
    assert [s["origin"] for s in off.stats] == ["gold", "gold", "teacher", "gold"]
    assert off.sources[0, :4].tolist() == [1, 1, 1, 1] and off.stats[0]["finished"]
    half = run(models, tokenizer, prompts * 8, "mixed", seed=2, params={"student_prob": 0.5, "coin": "sequence"},
               gold=gold * 8)
    origins = [s["origin"] for s in half.stats]
    assert 6 <= origins.count("student") <= 26
    for b, o in enumerate(origins):
        if o == "student":
            assert half.sources[b, 0] == 0
    # rows without gold need a teacher
    with pytest.raises(ConfigError, match="teacher"):
        run(models, tokenizer, prompts, "mixed", teacher=None, gold=gold)


def test_mixed_batch_coin_decides_for_the_whole_batch(models, tokenizer, prompts):
    """TRL trl/experimental/gkd/gkd_trainer.py ``training_step``: ``if random.random() <= self.lmbda`` once per
    call replaces every row by the student's sample, else the batch keeps its gold rows (GKD paper, Algorithm 1)."""
    gold = [[5, 6, 7, tokenizer.eos_token_id], [8] * 3, [9, 9], [9, tokenizer.eos_token_id]]
    kinds = []
    for seed in range(24):
        out = run(models, tokenizer, prompts, "mixed", seed=seed, params={"student_prob": 0.5}, gold=gold,
                  max_new_tokens=2)
        origins = {s["origin"] for s in out.stats}
        assert len(origins) == 1, origins           # never a mix inside one batch
        kinds.append(origins.pop())
    assert 5 <= kinds.count("student") <= 19        # Binomial(24, 0.5): outside this range has p < 0.01


# ---------------------------------------------------------------- errors and output

@pytest.mark.parametrize("policy", ["student", "teacher", "mixed", "switch", "scrg", "teacher_mix"])
def test_right_padded_view_equals_collate_for_training(models, tokenizer, prompts, policy):
    """The trainer consumes ``GenerationOutput.right_padded`` instead of re-collating: it must be the same batch."""
    from lmdistill.data.collate import collate_for_training
    from lmdistill.data.tokenize import TokenizedExample

    gold = [[5, 6, 7, tokenizer.eos_token_id], [8] * 30, None, [9, tokenizer.eos_token_id]]
    out = run(models, tokenizer, prompts, policy, seed=3, gold=gold if policy == "mixed" else None,
              params={"student_prob": 0.5} if policy == "mixed" else None)
    rows = [TokenizedExample(str(i), p, r) for i, (p, r) in enumerate(zip(prompts, out.responses))]
    ref = collate_for_training(rows, tokenizer.pad_token_id)
    got = out.right_padded(tokenizer.pad_token_id)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_bad_inputs_raise_clear_errors(models, tokenizer, prompts):
    with pytest.raises(ConfigError, match="unknown generation policy"):
        run(models, tokenizer, prompts, "beam")
    for policy in ("teacher", "switch", "scrg"):
        with pytest.raises(ConfigError, match="needs a teacher"):
            run(models, tokenizer, prompts, policy, teacher=None)
    with pytest.raises(ConfigError, match=r"prompts\[1\] is empty"):
        run(models, tokenizer, [[1, 2], []], "student")
    with pytest.raises(ConfigError, match="non-empty list"):
        run(models, tokenizer, [], "student")
    with pytest.raises(ConfigError, match="gold has 1 rows"):
        run(models, tokenizer, prompts, "mixed", gold=[[1]])
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=0)):
        with pytest.raises(ConfigError):
            SamplingConfig(**bad)
    for params, field, bad in ((SwitchParams, "decay", -1), (MixedParams, "student_prob", 2), (ScrgParams, "rounds", -1)):
        with pytest.raises(ConfigError, match=f"^{field}: "):
            params(**{field: bad})
    with pytest.raises(ConfigError, match="vocab_size"):
        run(models, tokenizer, prompts, "student", vocab_size=10**6)


def test_generation_leaves_training_mode_and_grads_alone(models, tokenizer, prompts):
    model = models["student"]
    model.train()
    try:
        out = generate(model, prompts, config=SamplingConfig(max_new_tokens=4, seed=0), pad_id=tokenizer.pad_token_id,
                       eos_id=tokenizer.eos_token_id)
        assert model.training
        assert not out.input_ids.requires_grad and out.input_ids.dtype == torch.long
    finally:
        model.eval()


def test_sample_loop_forced_prefix_frozen_rows_and_forced_eos(models, tokenizer, prompts):
    from lmdistill.generation.batch import Batch
    from lmdistill.generation.decode import sample_loop

    n, pad, eos = 8, tokenizer.pad_token_id, tokenizer.eos_token_id
    ids, mask = pad_left(prompts[:3], pad)
    cfg = SamplingConfig(max_new_tokens=n)
    batch = Batch(ids, mask, cfg, pad, eos, 4096, NoiseSource([1, 2, 3], 4096), torch.device("cpu"))
    old = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23, eos, pad, pad, pad, pad],
                        [31, 32, 33, 34, 35, 36, 37, 38]])
    lengths = torch.tensor([8, 4, 8])
    tokens = old.clone()
    tokens[0, 2] = eos  # row 0: its forced (corrected) token at position 2 is EOS
    free_from = torch.tensor([3, n, 5])  # row 1 frozen, row 2 forced up to position 4
    lm = CachedLM(models["student"], ids, mask, n)
    with torch.no_grad():
        first = lm.prefill()
        out, new_len = sample_loop(lm, first, batch, stream=1, tokens=tokens, lengths=lengths, free_from=free_from)
    assert out[0].tolist() == [11, 12, eos] + [pad] * 5 and new_len[0] == 3
    assert out[1].tolist() == old[1].tolist() and new_len[1] == 4
    assert out[2, :5].tolist() == old[2, :5].tolist() and new_len[2] == n
    ref = reference_sample(models["student"], prompts[2], n, cfg, 3, eos, stream=1, forced=old[2, :5].tolist())
    assert out[2].tolist() == ref


def test_teacher_mix_extremes_and_mixture_sampling(models, tokenizer, prompts):
    from lmdistill.generation.policies.teacher_mix import mixture_logits

    student = run(models, tokenizer, prompts, "student", seed=3, temperature=0.7)
    teacher = run(models, tokenizer, prompts, "teacher", seed=3, temperature=0.7)
    assert run(models, tokenizer, prompts, "teacher_mix", seed=3, temperature=0.7, params={"alpha": 0.0}).responses \
        == student.responses
    assert run(models, tokenizer, prompts, "teacher_mix", seed=3, temperature=0.7, params={"alpha": 1.0}).responses \
        == teacher.responses
    mid = run(models, tokenizer, prompts, "teacher_mix", seed=3, params={"alpha": 0.2})
    assert all(s["teacher_mix_alpha"] == 0.2 for s in mid.stats) and (mid.sources[mid.sources >= 0] == 0).all()
    # the mixture is a proper distribution: alpha p + (1 - alpha) q
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(3, 50, generator=g), torch.randn(3, 50, generator=g)
    mix = mixture_logits(q, p, 0.2)
    torch.testing.assert_close(mix.exp(), 0.2 * p.softmax(-1) + 0.8 * q.softmax(-1))
