"""DistiLLM as jongwooko/distillm runs it: the adaptive replay rule, the threshold rule, the skew KL, the corpus LM
term. Each reference rule is transcribed here in plain Python / float64 with the file and line it comes from."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lmdistill.errors import ConfigError, DataError
from lmdistill.losses import per_token_divergence
from lmdistill.losses.corpus_lm import CorpusLMTerm
from lmdistill.losses.term import TermInputs
from lmdistill.teachers import LocalTeacher
from lmdistill.train import load_config, train
from lmdistill.train.replay import ReplayBuffer


# ------------------------------------------------------------------ the replay decision (finetune.py:291-323)
def reference_action(r: float, threshold: float, global_step: int, total_iters: int, buffer_len: int,
                     capacity: int) -> str:
    """jongwooko/distillm finetune.py:291 (samp_threshold, replay_ratio 'decreasing', lines 297-298) and 311-323."""
    samp_threshold = threshold * (1 - global_step / total_iters)
    if r < samp_threshold or (r < threshold and buffer_len < capacity):
        return "generate"
    if r < threshold:
        return "replay"
    return "gold"


@pytest.mark.parametrize("seed", range(5))
def test_replay_decision_equals_finetune_py(seed):
    rng = random.Random(seed)
    for _ in range(400):
        threshold, total = rng.choice([0.0, 0.1, 0.5, 1.0, rng.random()]), rng.randint(1, 50)
        step, capacity = rng.randrange(total), rng.randint(2, 20)
        buf = ReplayBuffer(capacity, threshold, [{}] * rng.randint(0, capacity))
        draw = rng.randrange(2**31)
        r = random.Random(draw).random()
        ours = buf.decide(step, total, random.Random(draw))
        assert ours == reference_action(r, threshold, step + 1, total, len(buf.items), capacity)


def test_initial_threshold_zero_is_pure_gold():
    buf = ReplayBuffer(1000, 0.0)
    rng = random.Random(0)
    assert {buf.decide(s, 100, rng) for s in range(100)} == {"gold"}


def test_buffer_fills_to_capacity_before_replaying():
    """While the buffer is not full, every draw under the threshold generates fresh samples (finetune.py:311)."""
    buf, rng = ReplayBuffer(6, 1.0), random.Random(0)
    actions = []
    for step in range(40):
        a = buf.decide(step, 40, rng)
        actions.append(a)
        if a == "generate":
            buf.push([{"prompt_ids": [step], "response_ids": [k]} for k in range(2)])
    first_replay = actions.index("replay")
    assert all(a == "generate" for a in actions[:3]) and first_replay >= 3   # 3 x 2 rows fill capacity 6
    assert len(buf.items) == 6
    drawn = buf.sample(6, random.Random(1))
    assert len({id(d) for d in drawn}) == 6      # without replacement (random.sample, distillm/buffer.py:31)


# ------------------------------------------------------------------ the threshold rule (finetune.py:265-266, 411-417)
def reference_thresholds(init: float, losses: list[float], eps: float = 0.1) -> list[float]:
    """prev_avg_loss is the step-0 evaluation; it is replaced only when the threshold rises."""
    threshold, prev = init, losses[0]
    out = []
    for cur in losses[1:]:
        if cur >= prev + eps:
            threshold = min(threshold + 0.1, 1.0)
            prev = cur
        out.append(threshold)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_threshold_rule_equals_finetune_py(seed):
    rng = random.Random(seed)
    losses = [2.0]
    for _ in range(30):
        losses.append(losses[-1] + rng.choice([-0.15, -0.05, 0.0, 0.05, 0.1, 0.12, 0.3]))
    buf = ReplayBuffer(10, 0.0)
    ours = []
    for i, loss in enumerate(losses):
        buf.observe_val_loss(loss, 0.1, 0.1)
        if i:
            ours.append(buf.threshold)
    assert ours == pytest.approx(reference_thresholds(0.0, losses))
    # a slow drift (each rise < eps) never raises the threshold: the reference is not updated on every evaluation
    buf = ReplayBuffer(10, 0.0)
    for loss in [1.0, 1.06, 1.12]:
        buf.observe_val_loss(loss, 0.1, 0.1)
    assert buf.threshold == pytest.approx(0.1)       # 1.12 >= 1.0 + 0.1


def test_state_round_trip():
    buf = ReplayBuffer(4, 0.3, [{"prompt_ids": [1], "response_ids": [2]}], 1.5)
    back = ReplayBuffer.from_state(json.loads(json.dumps(buf.state())))
    assert back == buf


# ------------------------------------------------------------------ skew KL (distillm/losses.py:66-78)
def reference_skewed_forward_kl(logits, teacher_logits, mask, lam=0.1):
    """distillm/losses.py:66-78: -sum_v p log(lam p + (1 - lam) q), masked token mean (a cross-entropy)."""
    p = torch.softmax(teacher_logits, -1)
    q = torch.softmax(logits, -1)
    x = (p * torch.log(lam * p + (1 - lam) * q)).sum(-1)
    return -(x * mask).sum() / mask.sum()


def test_skl_equals_distillm_up_to_the_teacher_entropy_and_has_its_gradient():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 11, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(3, 5, 11, dtype=torch.float64, generator=g)
    mask = (torch.rand(3, 5, generator=g) > 0.3).double()
    ours = (per_token_divergence("skl", s, t, alpha=0.1) * mask).sum() / mask.sum()
    ref = reference_skewed_forward_kl(s, t, mask)
    p = torch.softmax(t, -1)
    neg_entropy = ((p * torch.log(p)).sum(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(ours, ref + neg_entropy, rtol=1e-12, atol=1e-12)   # KL = CE - H(p)
    g1, = torch.autograd.grad(ours, s)
    g2, = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ the corpus LM term (finetune.py:162-168, 341-343)
def test_corpus_lm_term_is_the_mean_token_ce_over_its_blocks(model_dirs, tokenizer, tmp_path):
    from lmdistill.models import load_model

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Document {i} says hello world number {i}."}) for i in range(30)))
    model = load_model(model_dirs["student"]).double()
    term = CorpusLMTerm(data=str(corpus), max_length=8, batch_size=3, seed=1)
    dummy = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long),
             "loss_mask": torch.zeros(1, 2, dtype=torch.long)}
    inputs = TermInputs(model, None, dummy, dummy, same=True, whole=False, tokenizer=tokenizer)
    loss = term(inputs)
    blocks = term.blocks[term.order(0)[:3]]
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-10, atol=1e-10)
    # the cursor is module state: a fresh term loaded from the state dict continues with the next blocks
    again = CorpusLMTerm(data=str(corpus), max_length=8, batch_size=3, seed=1)
    again.load_state_dict(term.state_dict())
    again.load(tokenizer)
    assert int(again.cursor) == 3
    # every block once per epoch
    n = len(term.blocks)
    seen = [term.order(c // n)[c % n] for c in range(n)]
    assert sorted(seen) == list(range(n))


def test_corpus_lm_teacher_ratio_is_minillm_pt_loss(model_dirs, tokenizer, tmp_path):
    """LMOps minillm/minillm/losses.py:198-226 (pt loss with --kd-ratio): (1 - r) CE + r * cross-entropy to the
    teacher's distribution, token means over the block."""
    from lmdistill.models import load_model

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"Sentence number {i} of the corpus." for i in range(20)))
    student = load_model(model_dirs["student"]).double()
    teacher = load_model(model_dirs["teacher"]).double()
    term = CorpusLMTerm(data=str(corpus), max_length=8, batch_size=2, teacher_ratio=0.5)
    dummy = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long),
             "loss_mask": torch.zeros(1, 2, dtype=torch.long)}
    loss = term(TermInputs(student, LocalTeacher(teacher), dummy, dummy, same=True, whole=False, tokenizer=tokenizer))
    blocks = term.blocks[term.order(0)[:2]]
    with torch.no_grad():
        s = student(input_ids=blocks).logits[:, :-1]
        t = teacher(input_ids=blocks).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(s.reshape(-1, s.shape[-1]), blocks[:, 1:].reshape(-1))
    tce = -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).mean()
    torch.testing.assert_close(loss.detach(), 0.5 * ce + 0.5 * tce, rtol=1e-10, atol=1e-10)
    assert CorpusLMTerm.reads_teacher({"teacher_ratio": 0.5}) and not CorpusLMTerm.reads_teacher({})
    with pytest.raises(ConfigError, match="teacher"):
        load_config("sft", [f"student={model_dirs['student']}", f"objective.corpus_lm.data={corpus}",
                            "objective.corpus_lm.teacher_ratio=0.5"])


def test_corpus_lm_errors_name_the_file_and_line(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="does not exist"):
        CorpusLMTerm.check_params({"data": str(tmp_path / "missing.jsonl")}, "objective[1] (corpus_lm)")
    with pytest.raises(ConfigError, match="name the corpus"):
        CorpusLMTerm.check_params({}, "objective[1] (corpus_lm)")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*'text'"):
        CorpusLMTerm(data=str(bad)).load(tokenizer)


# ------------------------------------------------------------------ the recipe, end to end
def test_distillm_recipe_is_the_reference_script(model_dirs):
    cfg = load_config("distillm", [f"student={model_dirs['student']}", f"teacher={model_dirs['teacher']}"])
    assert cfg.objective == [{"term": "skl", "weight": 1.0, "alpha": 0.1}]     # --kd-ratio 1.0, --type *-sfkl
    assert cfg.policy == {"name": "replay", "capacity": 1000, "init_threshold": 0.0, "threshold_step": 0.1,
                          "loss_eps": 0.1, "generator": {"name": "student"}}
    assert cfg.sampling["max_new_tokens"] == 256 and cfg.sampling["no_repeat_ngram_size"] == 0
    with pytest.raises(ConfigError, match="valid_data"):
        load_config("distillm", [f"student={model_dirs['student']}", f"teacher={model_dirs['teacher']}",
                                 "valid_data="])


def test_distillm_trains_with_step0_validation_replay_and_corpus(model_dirs, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i} of a small pre-training corpus." for i in range(50)))
    out = tmp_path / "run"
    cfg = load_config("distillm", [
        f"student={model_dirs['student']}", f"teacher={model_dirs['teacher']}", f"output_dir={out}",
        "max_train_examples=8", "batch_size=2", "micro_batch_size=2", "sampling.max_new_tokens=6", "eval_limit=2",
        "eval_steps=3", "max_steps=6", "save_steps=1000", "progress=false", "max_length=96", "max_prompt_length=80",
        "device=cpu", "policy.init_threshold=1.0", "policy.capacity=4", f"objective.corpus_lm.data={corpus}",
        "objective.corpus_lm.max_length=16"])
    train(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and "val/loss" in lines[0]                      # finetune.py:266
    steps = [x for x in lines if x["step"] > 0]
    assert all("loss/corpus_lm" in x and x["loss/corpus_lm"] > 0 for x in steps)
    fresh = [x.get("replay/fresh") for x in steps]
    assert fresh[:2] == [1.0, 1.0]                         # 2 x 2 rows fill capacity 4 before any replay
    assert 0.0 in fresh                                    # later micro-batches replay from the buffer
