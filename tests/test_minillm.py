"""MiniLLM against microsoft/LMOps ``minillm/``: the loss against the reference's formulas (transcribed below in
float64, in the reference's own layout: one response window per row), the rollout source's PPO schedule and its
checkpoint state, and the recipe end to end on the micro models.

Reference files (git show HEAD:minillm/...): ``minillm/losses.py``, ``minillm/sampler.py``, ``minillm/utils.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmdistill.data import load_examples, tokenize_examples
from lmdistill.errors import ConfigError
from lmdistill.losses.policy_gradient import (PolicyGradientTerm, discounted_returns, policy_gradient_rkl,
                                              whiten_advantages)
from lmdistill.models import load_model
from lmdistill.teachers import LocalTeacher
from lmdistill.train import Callback, load_config, train
from lmdistill.train.rollout import RolloutParams, RolloutSequences
from lmdistill.train.sources import make_sequence_source

F64 = torch.float64


# ------------------------------------------------------------------------------------------------ the reference
def ref_rollout(t_logprobs, s_logprobs, mask, alpha, reward_scaling, cliprange_reward):
    """sampler.py:101-131 for one rollout: rewards = t_rewards + ent_rewards (ent = -log q_old), scaled and clipped;
    w = q_old / ((1 - alpha) q_old + alpha p). Inputs are masked log-probs (0 outside the mask, utils.py:42)."""
    mix = (1 - alpha) * torch.exp(s_logprobs) + alpha * torch.exp(t_logprobs)        # sampler.py:112
    w = torch.exp(s_logprobs - torch.log(mix))                                        # sampler.py:114-115
    rewards = t_logprobs + (-s_logprobs)                                              # sampler.py:122-124
    if reward_scaling is not None:
        rewards = rewards / reward_scaling                                            # sampler.py:126-127
    if cliprange_reward:
        rewards = torch.clip(rewards, -cliprange_reward, cliprange_reward)            # sampler.py:129-131
    return rewards, w


def ref_whiten(xs):
    """utils.py:87-97 on its torch.distributed path (utils.py:72-84): mean and sum of squares over every element,
    divided by the element count; shift_mean=True."""
    count = xs.numel()
    mean = xs.sum() / count
    var = ((xs - mean) ** 2).sum() / count
    return (xs - mean) * torch.rsqrt(var + 1e-8)


def ref_advantages(rewards, mask, gamma, whiten=True):
    """losses.py:34-56: the discounted return from t to the window's end, divided by the tokens left from t."""
    lens = torch.cumsum(mask, -1)
    lens = mask - lens + lens[:, -1:]                       # losses.py:39-40: tokens from t to the end
    lens = torch.masked_fill(lens, lens == 0, 1)            # losses.py:41
    acc, back = torch.zeros_like(rewards[:, 0]), []
    for t in range(rewards.shape[1] - 1, -1, -1):           # losses.py:43-46
        acc = rewards[:, t] + gamma * acc
        back.append(acc)
    adv = torch.stack(back[::-1], 1) / lens                 # losses.py:48-49
    return ref_whiten(adv) if whiten else adv               # losses.py:53-54


def ref_loss(logits, t_logits, response, mask, old_logprobs, rewards, w, clip, gamma, single_step=True):
    """losses.py:126-173 on the response window: PPO-clipped ratio loss with w folded into the ratio, plus the
    single-step term E_q[log q - log p] (utils.py:15-28, 50-63; losses.py:102-105)."""
    logq_full = torch.log_softmax(logits, -1)
    logprobs = logq_full.gather(-1, response[..., None])[..., 0].masked_fill(~mask.bool(), 0)   # utils.py:38-42
    adv = ref_advantages(rewards, mask, gamma)
    n = mask.sum()                                                                               # losses.py:70
    ratio = torch.exp((logprobs - old_logprobs) * mask) * w                                      # losses.py:72-74
    loss1 = -adv * ratio                                                                         # losses.py:88
    loss2 = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)                                    # losses.py:89-93
    pg = torch.sum(torch.max(loss1, loss2) * mask) / n                                           # losses.py:94
    if not single_step:
        return pg
    q = torch.softmax(logits, -1)
    xent = -(q * torch.log_softmax(t_logits, -1)).sum(-1) * mask                                  # utils.py:58-62
    ent = -(q * logq_full).sum(-1) * mask                                                        # utils.py:23-27
    return pg + torch.sum((xent - ent) * mask) / mask.sum()                                      # losses.py:105, 173


# ------------------------------------------------------------------------------------------------ fixtures
def scripted(seed=0, vocab=11, window=7):
    """Three rows in our layout (prompt then response, right-padded; logits position t predicts token t+1) and the
    index map to the reference's response window."""
    g = torch.Generator().manual_seed(seed)
    prompts, lens = [3, 1, 4], [5, 2, 7]
    width = max(p + n for p, n in zip(prompts, lens))
    b = len(prompts)
    s_logits = (torch.randn(b, width - 1, vocab, generator=g, dtype=F64) * 2).requires_grad_(True)
    t_logits = torch.randn(b, width - 1, vocab, generator=g, dtype=F64) * 2
    targets = torch.randint(0, vocab, (b, width - 1), generator=g)
    mask = torch.zeros(b, width - 1, dtype=F64)
    for i, (p, n) in enumerate(zip(prompts, lens)):
        mask[i, p - 1:p - 1 + n] = 1
    # the behaviour student: the current one moved a little, so ratios leave [0.8, 1.2] at some positions
    with torch.no_grad():
        old_full = torch.log_softmax(s_logits + 0.4 * torch.randn(s_logits.shape, generator=g, dtype=F64), -1)
        old = old_full.gather(-1, targets[..., None])[..., 0] * mask
    return dict(s_logits=s_logits, t_logits=t_logits, targets=targets, mask=mask, old=old, prompts=prompts,
                lens=lens, window=window)


def to_window(x, d, fill=0.0):
    """Our ``[B, T-1, ...]`` positions -> the reference's ``[B, window, ...]`` response window (fill after each
    response, where the reference holds padding)."""
    out = []
    for i, (p, n) in enumerate(zip(d["prompts"], d["lens"])):
        row = x[i, p - 1:p - 1 + n]
        pad = torch.full((d["window"] - n, *row.shape[1:]), fill, dtype=row.dtype)
        out.append(torch.cat([row, pad]))
    return torch.stack(out)


def reference_value_and_grad(d, alpha, clip, gamma, reward_scaling, cliprange_reward, single_step=True):
    s = d["s_logits"].detach().clone().requires_grad_(True)
    logits_w = to_window(s, d)
    t_w = to_window(d["t_logits"], d)
    resp = to_window(d["targets"], d, fill=0)
    mask_w = to_window(d["mask"], d)
    old_w = to_window(d["old"], d)
    t_lp = torch.log_softmax(t_w, -1).gather(-1, resp[..., None])[..., 0] * mask_w
    rewards, w = ref_rollout(t_lp, old_w, mask_w, alpha, reward_scaling, cliprange_reward)
    loss = ref_loss(logits_w, t_w, resp, mask_w, old_w, rewards * mask_w, w, clip, gamma, single_step)
    loss.backward()
    return loss.detach(), s.grad


def ours_value_and_grad(d, **kw):
    s = d["s_logits"].detach().clone().requires_grad_(True)
    loss = policy_gradient_rkl(s, d["t_logits"], d["targets"], d["mask"], d["old"], window=d["window"], **kw)
    loss.backward()
    return loss.detach(), s.grad


# ------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("settings", [
    dict(alpha=0.2, clip=0.2, gamma=0.95, reward_scaling=0.5, cliprange_reward=100.0),   # the GPT-2 scripts
    dict(alpha=0.2, clip=0.2, gamma=0.95, reward_scaling=None, cliprange_reward=1.0),    # arguments.py defaults
    dict(alpha=0.0, clip=0.1, gamma=1.0, reward_scaling=None, cliprange_reward=None),
    dict(alpha=0.5, clip=0.3, gamma=0.5, reward_scaling=2.0, cliprange_reward=0.3),      # rewards really clipped
])
def test_loss_and_gradient_match_the_reference(seed, settings):
    d = scripted(seed)
    ref, ref_grad = reference_value_and_grad(d, **settings)
    ours, grad = ours_value_and_grad(d, **settings)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert grad.abs().sum() > 0


def test_without_single_step_term_it_is_the_clipped_ratio_loss_alone():
    d = scripted(3)
    kw = dict(alpha=0.2, clip=0.2, gamma=0.95, reward_scaling=0.5, cliprange_reward=100.0)
    ref, ref_grad = reference_value_and_grad(d, single_step=False, **kw)
    ours, grad = ours_value_and_grad(d, single_step=False, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_clipping_stops_the_gradient_where_the_ratio_left_the_range():
    """losses.py:88-94: where -A clip(rho) is the larger loss, the position gives no gradient through rho."""
    d = scripted(4)
    kw = dict(alpha=0.2, gamma=0.95, reward_scaling=0.5, cliprange_reward=100.0, single_step=False)
    _, tight = ours_value_and_grad(d, clip=0.0, **kw)     # every ratio != 1 is clipped on one side
    _, loose = ours_value_and_grad(d, clip=0.99, **kw)
    assert not torch.allclose(tight, loose)


def test_discounted_returns_are_the_gamma_weighted_future_sums():
    r = torch.randn(2, 6, dtype=F64)
    for gamma in (0.0, 0.95, 1.0):
        want = torch.stack([sum(gamma ** (s - t) * r[:, s] for s in range(t, 6)) for t in range(6)], 1)
        torch.testing.assert_close(discounted_returns(r, gamma), want)


def test_whitening_over_the_window_counts_the_padding_zeros():
    d = scripted(5)
    adv = torch.randn(d["mask"].shape, dtype=F64) * 3 + 1
    ours = whiten_advantages(adv, d["mask"], "window", d["window"])
    ref = ref_whiten(to_window(adv * d["mask"], d))
    torch.testing.assert_close(to_window(ours * d["mask"], d), ref * to_window(d["mask"], d))
    tok = whiten_advantages(adv, d["mask"], "tokens", d["window"])[d["mask"].bool()]
    sel = adv[d["mask"].bool()]
    torch.testing.assert_close(tok, (sel - sel.mean()) / torch.sqrt(sel.var(unbiased=False) + 1e-8))
    assert whiten_advantages(adv, d["mask"], "none", d["window"]) is adv


def test_length_norm_off_is_the_plain_discounted_return():
    d = scripted(6)
    kw = dict(alpha=0.2, clip=0.2, gamma=0.9, reward_scaling=None, cliprange_reward=None, whiten="none",
              single_step=False)
    on = float(ours_value_and_grad(d, **kw, length_norm=True)[0])
    off = float(ours_value_and_grad(d, **kw, length_norm=False)[0])
    assert on != pytest.approx(off)


def test_term_checks_its_parameters():
    ok = {"clip": 0.2, "gamma": 0.95, "whiten": "window"}
    PolicyGradientTerm.check_params(ok, "objective[0] (pg_rkl)")
    for bad, msg in [({"clip": 1.5}, "clip must be in"), ({"gamma": 1.2}, "gamma must be in"),
                     ({"whiten": "yes"}, "whiten must be one of window, tokens, none"),
                     ({"ppo_epochs": 4}, "ppo_epochs belong to the rollout policy now"),
                     ({"reward_scaling": 0}, "reward_scaling must be > 0"),
                     ({"length_norm": "on"}, "length_norm must be true or false"),
                     ({"beta": 1}, r"unknown parameter\(s\) beta")]:
        with pytest.raises(ConfigError, match=msg):
            PolicyGradientTerm.check_params(bad, "objective[0] (pg_rkl)")
    # the PPO schedule is the rollout policy's (policy: {name: rollout, ppo_epochs: ..., num_rollouts: ...})
    assert RolloutParams(ppo_epochs=4).ppo_epochs == 4
    for bad, msg in [({"ppo_epochs": 0}, "ppo_epochs: must be an integer >= 1"),
                     ({"num_rollouts": 2.5}, "num_rollouts: must be a positive integer or null")]:
        with pytest.raises(ConfigError, match=msg):
            RolloutParams(**bad)


# ------------------------------------------------------------------------------------------------ the rollout source
def overrides(model_dirs, out, **extra):
    o = {"student": model_dirs["student"], "teacher": model_dirs["teacher"], "output_dir": str(out),
         "max_train_examples": 16, "batch_size": 4, "micro_batch_size": 2, "sampling.max_new_tokens": 8,
         "valid_data": "", "save_steps": 1000, "eval_steps": 1000, "progress": False, "max_length": 96,
         "max_prompt_length": 80, "device": "cpu", "lr": 5e-3}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="module")
def rows(tokenizer):
    r, _ = tokenize_examples(load_examples("dolly:train").examples[:40], tokenizer, max_prompt_length=80,
                             max_length=96)
    return r


def served(src, rows, step, models, tokenizer, micros=2, size=2):
    out = []
    for m in range(micros):
        start = (step * micros + m) * size
        given = [rows[j % len(rows)] for j in range(start, start + size)]
        out.append(src.build(given, step=step, micro=m, rank=0, student=models[0], teacher=LocalTeacher(models[1]),
                             tokenizer=tokenizer))
    return out


def keyed(batches):
    """Each served sequence with its behaviour log-probs, as comparable tuples."""
    out = []
    for s in batches:
        for i, r in enumerate(s.rows):
            p, n = len(r.prompt_ids), len(r.response_ids)
            out.append((tuple(r.prompt_ids), tuple(r.response_ids),
                        tuple(s.batch["old_logprobs"][i, p:p + n].tolist())))
    return out


@pytest.mark.parametrize("num_rollouts", [None, 8])
def test_rollout_serves_each_sample_ppo_epochs_times_then_regenerates(model_dirs, tokenizer, rows, tmp_path,
                                                                      num_rollouts):
    extra = {"policy.ppo_epochs": 3}
    if num_rollouts:
        extra["policy.num_rollouts"] = num_rollouts
    cfg = load_config("minillm", overrides(model_dirs, tmp_path, **extra))
    student, teacher = load_model(model_dirs["student"]), load_model(model_dirs["teacher"])
    src = make_sequence_source(cfg)
    assert isinstance(src, RolloutSequences)
    k = (num_rollouts or cfg.batch_size) // cfg.batch_size
    assert (src.k, src.ppo_epochs) == (k, 3)
    steps = [served(src, rows, s, (student, teacher), tokenizer) for s in range(2 * 3 * k)]
    fresh = [s[0].stats["rollout/fresh"] for s in steps]
    assert fresh == ([1.0] * k + [0.0] * 2 * k) * 2
    for rnd in range(2):
        passes = [sorted(x for s in steps[rnd * 3 * k + e * k: rnd * 3 * k + (e + 1) * k] for x in keyed(s))
                  for e in range(3)]
        assert passes[0] == passes[1] == passes[2]                       # each sample served ppo_epochs times
        assert len(set(passes[0])) == len(passes[0]) == 4 * k            # each once per pass
    # the next round samples the prompts the trainer hands over at its first step
    given = [rows[j % len(rows)].prompt_ids for j in range(3 * k * 4, 3 * k * 4 + 4)]
    assert [list(x[0]) for x in keyed(steps[3 * k])] == given
    # the stored log-probs are the sampling student's: a forward of the (unchanged) student gives them again
    s = steps[0][0]
    with torch.no_grad():
        lp = torch.log_softmax(student(input_ids=s.batch["input_ids"],
                                       attention_mask=s.batch["attention_mask"]).logits[:, :-1].float(), -1)
    lp = lp.gather(-1, s.batch["input_ids"][:, 1:, None])[..., 0] * s.batch["loss_mask"][:, 1:]
    torch.testing.assert_close(s.batch["old_logprobs"][:, 1:], lp, rtol=1e-5, atol=1e-6)
    # passes after the first reshuffle the store across the step's micro-batches
    if k == 1:
        orders = [[x[:2] for x in keyed(steps[e])] for e in range(3)]
        assert orders[1] != orders[0] or orders[2] != orders[0]


def test_rollout_state_round_trips_exactly(model_dirs, tokenizer, rows, tmp_path):
    cfg = load_config("minillm", overrides(model_dirs, tmp_path, **{"policy.ppo_epochs": 3}))
    models = (load_model(model_dirs["student"]), load_model(model_dirs["teacher"]))
    a = make_sequence_source(cfg)
    served(a, rows, 0, models, tokenizer)
    state = json.loads(json.dumps(a.state()))                           # as the checkpoint stores it
    b = make_sequence_source(cfg)
    b.load_state(state)
    for step in (1, 2):
        x, y = served(a, rows, step, models, tokenizer), served(b, rows, step, models, tokenizer)
        for s, t in zip(x, y):
            assert s.batch.keys() == t.batch.keys()
            assert all(torch.equal(s.batch[key], t.batch[key]) for key in s.batch)
    b.load_state(None)                                                  # nothing saved: keeps its state
    assert b.items


def test_rollout_needs_whole_steps(model_dirs, tmp_path):
    cfg = load_config("minillm", overrides(model_dirs, tmp_path, **{"policy.num_rollouts": 6}))
    with pytest.raises(ConfigError, match=r"num_rollouts: \(6\) must be a multiple of batch_size \(4\)"):
        make_sequence_source(cfg)


# ------------------------------------------------------------------------------------------------ the recipe
def test_recipe_is_the_reference_script():
    cfg = load_config("minillm", ["student=S", "teacher=T"])
    assert cfg.policy["name"] == "rollout" and cfg.lr == 5e-6 and cfg.lr_schedule == "constant"
    assert cfg.policy["alpha"] == 0.2 and cfg.sampling["max_new_tokens"] == 256
    assert cfg.sampling["top_k"] == 0 and cfg.sampling["top_p"] == 1.0 and cfg.sampling["temperature"] == 1.0
    (pg,) = cfg.objective
    assert pg["term"] == "pg_rkl" and pg["weight"] == 1.0
    assert {k: pg[k] for k in ("clip", "gamma", "reward_scaling", "cliprange_reward", "single_step",
                               "length_norm", "whiten")} == {
        "clip": 0.2, "gamma": 0.95, "reward_scaling": 0.5, "cliprange_reward": 100,
        "single_step": True, "length_norm": True, "whiten": "window"}
    assert cfg.policy["ppo_epochs"] == 4


class Crash(Callback):
    def __init__(self, at):
        self.at = at

    def on_step_begin(self, run, step):
        if step == self.at:
            raise KeyboardInterrupt


def test_recipe_trains_and_resumes_bit_exact_mid_rollout(model_dirs, tmp_path):
    """ppo_epochs 2: steps {0,1}, {2,3}, {4,5} are rounds; the checkpoint after step 3 of 5 holds round 1's store."""
    from safetensors.torch import load_file

    common = {"max_steps": 5, "policy.ppo_epochs": 2, "save_steps": 3}
    full = train(load_config("minillm", overrides(model_dirs, tmp_path / "full", **common)))
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/fresh"] for r in rows] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert all(math.isfinite(r["loss"]) for r in rows)
    part = load_config("minillm", overrides(model_dirs, tmp_path / "part", **common))
    with pytest.raises(KeyboardInterrupt):
        train(part, callbacks=[Crash(4)])
    resumed = train(part, resume=True)
    a, b = load_file(f"{full['final']}/model.safetensors"), load_file(f"{resumed['final']}/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(f"{model_dirs['student']}/model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)
