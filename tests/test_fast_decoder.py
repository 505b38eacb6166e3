"""The fast decoder against the HF forward it replaces, for every family it claims, and its refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.errors import ConfigError
from lmdistill.generation import SamplingConfig, generate
from lmdistill.generation.decode import front_permutation
from lmdistill.generation.engine import pad_left
from lmdistill.generation.fast_decoder import unsupported_reason
from lmdistill.generation.runner import CachedLM

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _config(family: str, **extra):
    import transformers

    kw = dict(COMMON)
    if family == "llama":  # grouped-query attention, biases, scaled RoPE, untied head
        kw.update(num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=10000.0)
        cls = transformers.LlamaConfig
    elif family == "llama3":
        kw.update(num_key_value_heads=4, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        cls = transformers.LlamaConfig
    elif family == "qwen2":  # q/k/v biases, GQA
        kw.update(num_key_value_heads=2)
        cls = transformers.Qwen2Config
    elif family == "qwen3":  # per-head q/k RMSNorm, head_dim != hidden / heads
        kw.update(num_key_value_heads=2, head_dim=24)
        cls = transformers.Qwen3Config
    elif family == "mistral":
        kw.update(num_key_value_heads=1, sliding_window=None)
        cls = transformers.MistralConfig
    else:
        raise ValueError(family)
    kw.update(extra)
    return cls(**kw)


def _model(tmp_path_factory, family: str, seed: int = 0, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, **extra))
    with torch.no_grad():  # random biases/norm weights, so they matter in the comparison
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.2)
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


FAMILIES = ["llama", "llama3", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    return request.param, _model(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def family_teacher(family_model, tmp_path_factory):
    return _model(tmp_path_factory, family_model[0], seed=1)


PROMPTS = [[5, 17, 33, 9, 41, 7], [12, 8], [99, 98, 97, 96, 95, 94, 93, 92, 91], [3]]


def _full(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_families_are_supported(family_model):
    name, model = family_model
    assert unsupported_reason(model, 64) is None, name
    ids, mask = pad_left(PROMPTS, 0)
    assert CachedLM(model, ids, mask, 4).backend == "fast"


def test_steps_score_crop_extend_equal_hf_forward(family_model):
    name, model = family_model
    ids, mask = pad_left(PROMPTS, 0)
    g = torch.Generator().manual_seed(3)
    resp = torch.randint(3, VOCAB, (len(PROMPTS), 8), generator=g)
    lm = CachedLM(model, ids, mask, max_new_tokens=8, backend="fast")
    with torch.no_grad():
        steps = torch.stack([lm.prefill()] + [lm.step(resp[:, t]) for t in range(7)], 1)
        scored = lm.score(resp)
        lm.crop(3)
        resp2 = resp.clone()
        resp2[:, 3:] = torch.randint(3, VOCAB, (len(PROMPTS), 5), generator=g)
        extended = lm.extend(resp2[:, 3:7])  # predicts tokens 4..7
    for b, p in enumerate(PROMPTS):
        ref = _full(model, p + resp[b].tolist())[len(p) - 1:len(p) + 7]
        torch.testing.assert_close(steps[b], ref, atol=2e-5, rtol=1e-4, msg=f"{name} steps row {b}")
        torch.testing.assert_close(scored[b], ref, atol=2e-5, rtol=1e-4, msg=f"{name} score row {b}")
        ref2 = _full(model, p + resp2[b].tolist())[len(p) + 3:len(p) + 7]
        torch.testing.assert_close(extended[b], ref2, atol=2e-5, rtol=1e-4, msg=f"{name} extend row {b}")


@pytest.mark.parametrize("policy", ["student", "switch", "scrg"])
def test_fast_and_hf_decoders_generate_the_same_tokens(family_model, family_teacher, policy):
    name, model = family_model
    outs = {}
    params = {"tau0": 0.05, "decay": 0.0} if policy == "switch" else None
    for decoder in ("fast", "hf"):
        cfg = SamplingConfig(max_new_tokens=10, seed=11, decoder=decoder)
        outs[decoder] = generate(model, PROMPTS, policy, teacher=family_teacher if policy != "student" else None,
                                 config=cfg, params=params, pad_id=0, eos_id=1)
    assert outs["fast"].responses == outs["hf"].responses, name
    assert torch.equal(outs["fast"].sources, outs["hf"].sources)


def test_weights_are_read_at_every_call(tmp_path_factory):
    """A model trained between (or during) generations must be seen as it is now, not as when cached."""
    model = _model(tmp_path_factory, "qwen2")
    ids, mask = pad_left(PROMPTS, 0)
    lm = CachedLM(model, ids, mask, 4, backend="fast")
    with torch.no_grad():
        before = lm.prefill()
        model.model.layers[1].mlp.down_proj.weight.mul_(3.0)
        model.lm_head.weight.add_(0.1)
        after = lm.prefill()
    assert not torch.allclose(before, after)
    for b, p in enumerate(PROMPTS):
        torch.testing.assert_close(after[b], _full(model, p)[-1], atol=2e-5, rtol=1e-4)


def test_bfloat16_matches_hf_within_bf16_rounding(tmp_path_factory):
    model = _model(tmp_path_factory, "llama").to(torch.bfloat16)
    ids, mask = pad_left(PROMPTS, 0)
    resp = torch.randint(3, VOCAB, (len(PROMPTS), 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fast = CachedLM(model, ids, mask, 6, backend="fast").score(resp)
        hf = CachedLM(model, ids, mask, 6, backend="hf").score(resp)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), hf.float(), atol=0.05, rtol=0.05)


def test_unsupported_models_fall_back_to_hf_or_refuse_fast(tmp_path_factory):
    ids, mask = pad_left(PROMPTS, 0)
    short_window = _model(tmp_path_factory, "mistral", sliding_window=8)
    assert "sliding window of 8" in unsupported_reason(short_window, 32)
    assert unsupported_reason(short_window, 8) is None  # a window as long as the sequence is full attention
    assert CachedLM(short_window, ids, mask, 20).backend == "hf"
    with pytest.raises(ConfigError, match="sliding window"):
        CachedLM(short_window, ids, mask, 20, backend="fast")
    dynamic = _model(tmp_path_factory, "llama3", rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                     rope_theta=10000.0)
    assert "RoPE type 'dynamic'" in unsupported_reason(dynamic, 16)


def test_lora_wrapped_model_runs_on_hf_and_generates_the_same(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    base = _model(tmp_path_factory, "llama3")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    ids, mask = pad_left(PROMPTS, 0)
    reason = unsupported_reason(model.base_model.model, 16)
    assert reason is not None and "not a plain Linear" in reason
    lm = CachedLM(model, ids, mask, 4)
    assert lm.backend == "hf"
    with torch.no_grad():
        logits = lm.prefill()
    for b, p in enumerate(PROMPTS):
        torch.testing.assert_close(logits[b], _full(model, p)[-1], atol=2e-5, rtol=1e-4)


def test_other_architectures_are_named_in_the_refusal():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert "model type 'gpt2'" in unsupported_reason(model, 16)
    ids, mask = pad_left(PROMPTS, 0)
    with pytest.raises(ConfigError, match="gpt2"):
        CachedLM(model, ids, mask, 4, backend="fast")
    with pytest.raises(ConfigError, match="decoder must be one of"):
        SamplingConfig(decoder="vllm")


@pytest.mark.parametrize("policy", ["student", "switch", "teacher_mix"])
def test_finished_rows_leave_the_batch_and_tokens_do_not_change(family_model, family_teacher, policy, monkeypatch):
    """Rows that hit EOS are dropped from the forward passes (the batch is re-ordered); the output is what
    the HF decoder, which runs every row to the end, produces."""
    name, model = family_model
    params = {"switch": {"tau0": 0.05, "decay": 0.0}, "teacher_mix": {"alpha": 0.3}}.get(policy)
    kw = dict(teacher=family_teacher if policy != "student" else None, pad_id=0, params=params)

    def cfg(**extra):
        return SamplingConfig(max_new_tokens=12, seed=4, **extra)

    free = generate(model, PROMPTS, policy, config=cfg(), eos_id=None, **kw).responses
    eos = next(t for i, t in enumerate(free[1]) if i >= 2 and t not in free[1][:i])  # row 1 stops early
    reorders = []
    original = CachedLM.reorder
    monkeypatch.setattr(CachedLM, "reorder", lambda self, order: (reorders.append(order.tolist()),
                                                                  original(self, order))[1])
    outs = {d: generate(model, PROMPTS, policy, config=cfg(decoder=d), eos_id=eos, **kw) for d in ("fast", "hf")}
    assert outs["fast"].responses == outs["hf"].responses, name
    assert torch.equal(outs["fast"].sources, outs["hf"].sources)
    for a, b in zip(outs["fast"].stats, outs["hf"].stats):
        assert a.keys() == b.keys()
        if "jsd" in a:
            assert a["jsd"] == pytest.approx(b["jsd"], abs=1e-5)
    lengths = [len(r) for r in outs["fast"].responses]
    assert min(lengths) < 12 and max(lengths) == 12, "some rows must finish early, others not"
    assert reorders, "a finished row should have been moved out of the computed rows"


@settings(max_examples=300, deadline=None)
@given(needed=st.lists(st.booleans(), min_size=1, max_size=40))
def test_front_permutation_brings_the_needed_rows_forward_moving_the_fewest(needed):
    """A permutation whose first k slots hold exactly the k needed rows, each row already in place stays, and only
    2 x (unneeded rows among the first k) rows move: the fewest any such permutation can move."""
    k = sum(needed)
    perm = front_permutation(needed, k)
    assert sorted(perm) == list(range(len(needed)))
    assert sorted(perm[:k]) == [i for i, n in enumerate(needed) if n]
    holes = sum(1 for i in range(k) if not needed[i])
    assert sum(p != i for i, p in enumerate(perm)) == 2 * holes
    assert all(perm[i] == i for i in range(k) if needed[i])
