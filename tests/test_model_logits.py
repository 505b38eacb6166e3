"""The model's own logits on every path (issue 29, item 1).

A model may change its logits after the LM head inside ``forward``: Gemma-2 soft-caps them,
``cap * tanh(z / cap)`` (transformers 5.25.0, ``models/gemma2/modeling_gemma2.py:519-523``,
``Gemma2ForCausalLM.forward``), Cohere multiplies them by ``config.logit_scale``
(``models/cohere/modeling_cohere.py:497-498``). Paths that apply the head to hidden states themselves scored
raw ``h @ W.T`` instead: the bug huggingface/trl#6629 guards TRL against (Liger's fused loss applies neither the cap
nor the scale, so TRL refuses it for such models).

Each path here runs on a tiny Gemma-2 (cap 2, head scaled so raw logits reach ~±40) and a tiny Cohere (scale
0.25, head scaled): log-probabilities (and, for the losses, values and gradients with respect to the student's
parameters) equal a float64 computation from ``model(ids).logits``. Before the fix the teacher's selected logits,
the chunked kernels and capture used the raw logits (forward KL 8.13 instead of 0.63 in the issue's measurement).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, CohereConfig, Gemma2Config, LlamaConfig, LlamaForCausalLM

from lmdistill.cli import main
from lmdistill.data import collate_for_training, load_examples, tokenize_examples
from lmdistill.errors import ConfigError
from lmdistill.generation import SamplingConfig, generate
from lmdistill.generation.fast_decoder import unsupported_reason
from lmdistill.generation.noise import NoiseSource
from lmdistill.generation.runner import CachedLM
from lmdistill.losses.chunked import chunked_divergence
from lmdistill.losses.model_forward import forward_hidden, head_transform, selected_logits
from lmdistill.losses.model_logits import POSTPROCESSING, head_logits, logit_transform
from lmdistill.losses.objective import TERMS, Objective
from lmdistill.losses.sparse import top_k_teacher
from lmdistill.losses.term import TermInputs
from lmdistill.models import load_model
from lmdistill.quantify.whitebox import compare_many, compare_on
from lmdistill.serve import ServerThread, create_app
from lmdistill.teachers import LocalTeacher, TeacherCache
from lmdistill.teachers.served import ServedTeacher

CAP = 2.0
LEN = dict(max_prompt_length=80, max_length=96)


def tiny(kind: str, tokenizer, seed: int):
    """A tiny Gemma-2 (cap 2) or Cohere (scale 0.25) with an untied head scaled far past the cap."""
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False)
    if kind == "gemma2":
        cfg = Gemma2Config(**shape, **ids, head_dim=16, final_logit_softcapping=CAP, attn_logit_softcapping=None)
    else:
        cfg = CohereConfig(**shape, **ids, logit_scale=0.25)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0 / model.lm_head.weight.norm(dim=1, keepdim=True).mean())
    return model


@pytest.fixture(scope="module")
def capped_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("capped")
    dirs = {}
    for name, kind, seed in (("teacher", "gemma2", 1), ("student", "gemma2", 2), ("cohere", "cohere", 3)):
        tiny(kind, tokenizer, seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


@pytest.fixture(scope="module")
def zoo(capped_dirs, model_dirs):
    """Loaded models: the capped teacher and the students (Gemma-2, Cohere, and the micro Llama)."""
    return {**{k: load_model(v, trainable=k != "teacher").eval() for k, v in capped_dirs.items()},
            "llama": load_model(model_dirs["student"], trainable=True).eval()}


@pytest.fixture(scope="module")
def data(tokenizer):
    rows, _ = tokenize_examples(load_examples("dolly:train").examples[:4], tokenizer, **LEN)
    return rows, collate_for_training(rows, tokenizer.pad_token_id)


def reference(model, batch) -> torch.Tensor:
    """float64 log-probabilities ``[B, T-1, V]`` from the model's own forward (gradient kept)."""
    attn = batch["attention_mask"]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=attn, position_ids=pos).logits
    return torch.log_softmax(logits[:, :-1].double(), -1)


def decoder_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states (what the LM head reads) for ``ids``."""
    caught = {}

    def hook(_m, _i, out):
        caught["h"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    handle = model.get_decoder().register_forward_hook(hook)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return caught["h"]


def raw_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """``h @ W.T`` without the model's post-processing (what the old paths used)."""
    with torch.no_grad():
        return model.get_output_embeddings()(decoder_hidden(model, ids))


def kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    return (lp.exp() * (lp - lq)).sum(-1)


def test_raw_logits_are_far_past_the_cap(zoo, data):
    raw = raw_logits(zoo["teacher"], data[1]["input_ids"])
    assert raw.abs().max() > 4 * CAP
    assert zoo["teacher"](input_ids=data[1]["input_ids"]).logits.abs().max() <= CAP


# ------------------------------------------------------------------------------ the table itself
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VALUES = {"final_logit_softcapping": 2.0, "logit_scale": 0.5, "logits_scaling": 4.0, "lm_head_multiplier": 0.5}


@pytest.mark.parametrize("model_type", sorted(POSTPROCESSING))
def test_the_table_is_what_each_architectures_forward_does(model_type):
    cfg = AutoConfig.for_model(model_type, **TINY)
    for _, name in POSTPROCESSING[model_type]:
        setattr(cfg, name, VALUES[name])
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        cfg.attn_logit_softcapping = None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
        ids = torch.randint(3, 128, (2, 9))
        want = model(input_ids=ids).logits
        h = decoder_hidden(model, ids)
        assert torch.allclose(head_logits(model, h), want, atol=1e-5, rtol=1e-5)
        raw = model.get_output_embeddings()(h)
        assert torch.allclose(raw, want) == (not POSTPROCESSING[model_type])  # the steps matter where there are any


class MysteryConfig(LlamaConfig):
    model_type = "mystery_lm"


def test_an_unknown_model_type_is_refused_by_name_where_only_hidden_states_are_at_hand(data, tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(MysteryConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, logits_scaling=4.0))
    rows, batch = data
    assert logit_transform(model) is None
    with pytest.raises(ConfigError, match=r"'mystery_lm' \(config.model_type\).*config.logits_scaling=4.0"):
        head_transform(model)
    inputs = TermInputs(model, LocalTeacher(model), batch, batch, same=True, whole=False)
    with pytest.raises(ConfigError, match="mystery_lm"):
        TERMS["fkl"]().chunked(inputs)
    # paths that can run the full forward use it: the forward's logits, whatever it does
    mask = batch["loss_mask"][:, 1:].bool()
    with torch.no_grad():
        assert torch.allclose(torch.log_softmax(selected_logits(model, batch, mask).double(), -1),
                              reference(model, batch)[mask], atol=1e-6)
    objective = Objective([{"term": "fkl", "weight": 1.0}])
    assert objective.whole_logits(model) and objective.whole_logits(None, model)
    known = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "model_type": "llama"}))
    assert not objective.whole_logits(known, known)
    assert unsupported_reason(model, 16) is not None


def test_a_head_with_a_bias_is_refused_where_only_its_weight_is_used():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("phi", **TINY)).eval()  # Phi's lm_head has a bias
    batch = {"input_ids": torch.randint(3, 128, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    with pytest.raises(ConfigError, match=r"'phi' has an LM head with a bias \(lm_head.bias\)"):
        forward_hidden(model, batch)
    with torch.no_grad():  # the head module itself (bias included) serves the selected positions
        want = model(**batch).logits[:, :-1].reshape(-1, 128)
        assert torch.allclose(selected_logits(model, batch, torch.ones(2, 5)), want, atol=1e-6)


def test_a_forward_that_disagrees_with_the_table_is_refused(zoo, data, monkeypatch):
    monkeypatch.setitem(POSTPROCESSING, "gemma2", ())
    with pytest.raises(ConfigError, match="'gemma2'.*does not match"):
        selected_logits(zoo["teacher"], data[1], data[1]["loss_mask"][:, 1:])


# ------------------------------------------------------------------------------ the objective's logits and losses
@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("student", ["student", "cohere", "llama"])
def test_term_inputs_give_each_models_own_log_probabilities(zoo, data, student, whole):
    _, batch = data
    mask = batch["loss_mask"][:, 1:].bool()
    inputs = TermInputs(zoo[student], LocalTeacher(zoo["teacher"]), batch, batch, same=True, whole=whole)
    with torch.no_grad():
        for got, model in ((inputs.student_logits, zoo[student]), (inputs.teacher_logits, zoo["teacher"])):
            got = torch.log_softmax(got.double(), -1)
            assert torch.allclose(got[mask] if whole else got, reference(model, batch)[mask], atol=2e-5)


def reference_loss(term: str, student, teacher, batch) -> torch.Tensor:
    mask = batch["loss_mask"][:, 1:].bool()
    lq = reference(student, batch)[mask]
    if term == "sft":
        return -lq.gather(-1, batch["input_ids"][:, 1:][mask][:, None]).mean()
    with torch.no_grad():
        lp = reference(teacher, batch)[mask]
    if term == "fkl":
        return kl(lp, lq).mean()
    lm = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    return (0.5 * kl(lp, lm) + 0.5 * kl(lq, lm)).mean()  # jsd, beta = 0.5


def grads_of(model, loss) -> dict:
    model.zero_grad()
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


@pytest.mark.parametrize("path", ["selected", "whole", "chunked"])
@pytest.mark.parametrize("term", ["fkl", "jsd", "sft"])
@pytest.mark.parametrize("student", ["student", "cohere"])
def test_loss_values_and_gradients_equal_float64_from_the_forward(zoo, data, student, term, path):
    _, batch = data
    s, t = zoo[student], zoo["teacher"]
    module = TERMS[term](**({"beta": 0.5} if term == "jsd" else {}))
    inputs = TermInputs(s, LocalTeacher(t), batch, batch, same=True, whole=path == "whole")
    got = module.chunked(inputs) if path == "chunked" else module(inputs)
    want = reference_loss(term, s, t, batch)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
    g_got, g_want = grads_of(s, got), grads_of(s, want)
    assert g_got.keys() == g_want.keys()
    for name in g_want:
        scale = float(g_want[name].abs().max())
        assert torch.allclose(g_got[name], g_want[name], atol=1e-5 * max(scale, 1e-3), rtol=1e-4), name


def test_chunked_kernel_caps_inside_each_chunk_for_a_dense_and_a_sparse_teacher(zoo, data):
    _, batch = data
    s, t = zoo["student"], zoo["teacher"]
    mask = batch["loss_mask"][:, 1:]
    h, w = forward_hidden(s, batch)
    with torch.no_grad():
        th, tw = forward_hidden(t, batch)
        lp = reference(t, batch)[mask.bool()]
    lq = reference(s, batch)[mask.bool()]
    want = kl(lp, lq).mean()
    g_want = torch.autograd.grad(want, w, retain_graph=True)[0]
    tf = dict(student_transform=logit_transform(s))
    for teacher in (dict(teacher_hidden=th[:, :-1], teacher_head_weight=tw, teacher_transform=logit_transform(t)),
                    dict(teacher_sparse=top_k_teacher(lp.float(), lp.shape[-1]))):
        for kw in (dict(chunk_size=3), dict(chunk_size=1000)):
            got = chunked_divergence("fkl", h[:, :-1], w, mask=mask, **tf, **teacher, **kw)
            assert float(got) == pytest.approx(float(want), rel=1e-5)
            g = torch.autograd.grad(got, w, retain_graph=True)[0]
            assert torch.allclose(g, g_want.float(), atol=1e-6 * float(g_want.abs().max()) + 1e-9, rtol=1e-4)
    raw = chunked_divergence("fkl", h[:, :-1].detach(), w.detach(), mask=mask, teacher_hidden=th[:, :-1],
                             teacher_head_weight=tw)
    assert float(raw) > 3 * float(want)  # without the cap: a different objective (the 33.0 vs 1.85)


# ------------------------------------------------------------------------------ capture, serving, white-box
def dense(sparse, vocab: int) -> torch.Tensor:
    out = torch.full((sparse.ids.shape[0], vocab), float("-inf"), dtype=torch.float64)
    return out.scatter_(1, sparse.ids, sparse.logprobs.double())


def test_capture_at_top_k_vocabulary_stores_the_capped_log_probabilities(capped_dirs, zoo, data, tmp_path):
    rows, batch = data
    assert main(["capture", "--teacher", capped_dirs["teacher"], "--data", "dolly:train", "--out", str(tmp_path / "c"),
                 "--top-k", str(10 ** 6), "--limit", "4", "--max-length", "96", "--max-prompt-length", "80",
                 "--template", "alpaca", "--logprob-dtype", "float32", "--no-progress"]) == 0
    got = dense(TeacherCache(tmp_path / "c").top_k(rows, batch), len(zoo["teacher"].lm_head.weight))
    with torch.no_grad():
        want = reference(zoo["teacher"], batch)[batch["loss_mask"][:, 1:].bool()]
    assert torch.allclose(got, want, atol=1e-5)
    assert float((got.max(-1).values - got.min(-1).values).max()) <= 2 * CAP + 1e-4  # the cap allows 4 nats


@pytest.mark.parametrize("max_batch_size", [0, 4])
def test_served_echo_logprobs_are_the_capped_ones(zoo, data, tokenizer, max_batch_size):
    rows, batch = data
    app = create_app(zoo["teacher"], tokenizer, model_name="gemma", max_logprobs=len(tokenizer),
                     max_batch_size=max_batch_size)
    with ServerThread(app) as srv:
        got = ServedTeacher.from_spec(f"openai:gemma@{srv.base_url}", top_k=len(tokenizer), api="echo")
        got = dense(got.top_k(rows, batch), len(tokenizer))
    with torch.no_grad():
        want = reference(zoo["teacher"], batch)[batch["loss_mask"][:, 1:].bool()]
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("student", ["student", "cohere"])
def test_whitebox_kl_is_the_float64_kl_of_the_forwards(zoo, prompts, student):
    seqs = [(p + p[::-1][:5], len(p)) for p in prompts]
    many = compare_many(zoo["teacher"], zoo[student], seqs)
    for (ids, n), got in zip(seqs, many):
        x = torch.tensor([ids])
        with torch.no_grad():
            lp = torch.log_softmax(zoo["teacher"](input_ids=x).logits[0, n - 1:-1].double(), -1)
            lq = torch.log_softmax(zoo[student](input_ids=x).logits[0, n - 1:-1].double(), -1)
        want = float(kl(lp, lq).sum())
        assert got["kl_sum"] == pytest.approx(want, rel=1e-4)
        assert compare_on(zoo["teacher"], zoo[student], ids, n)["kl_sum"] == pytest.approx(want, rel=1e-4)


# ------------------------------------------------------------------------------ decoding: SWITCH, SCRG, evaluation
def row_logprobs(model, ids: list[int], raw: bool = False) -> torch.Tensor:
    x = torch.tensor([ids])
    with torch.no_grad():
        z = raw_logits(model, x) if raw else model(input_ids=x).logits
    return torch.log_softmax(z[0].double(), -1)


def test_the_decoder_runs_a_capped_model_through_its_own_forward(zoo, prompts, tokenizer):
    model = zoo["teacher"]
    assert "gemma2" in unsupported_reason(model, 64)
    ids, mask = torch.tensor([prompts[0]]), torch.ones(1, len(prompts[0]), dtype=torch.long)
    with pytest.raises(ConfigError, match="gemma2"):
        CachedLM(model, ids, mask, 4, backend="fast")
    lm = CachedLM(model, ids, mask, 4)
    assert lm.backend == "hf"
    with torch.no_grad():
        want = model(input_ids=ids).logits[0, -1]
        assert torch.allclose(lm.prefill()[0], want, atol=1e-5)


def test_sampled_decoding_draws_from_the_capped_distribution(zoo, prompts):
    model, keys, n = zoo["student"], [11, 12, 13, 14], 8
    out = generate(model, prompts, "student", config=SamplingConfig(max_new_tokens=n), pad_id=0, eos_id=None,
                   row_keys=keys)

    def sample(prompt, key, raw):
        ids = list(prompt)
        for t in range(n):
            g = NoiseSource([key], len(model.lm_head.weight)).gumbel(t)[0].double()
            ids.append(int((row_logprobs(model, ids, raw)[-1] + g).argmax()))
        return ids[len(prompt):]

    assert [list(r) for r in out.responses] == [sample(p, k, False) for p, k in zip(prompts, keys)]
    assert [list(r) for r in out.responses] != [sample(p, k, True) for p, k in zip(prompts, keys)]


def jsd(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    lm = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    return 0.5 * kl(lp, lm) + 0.5 * kl(lq, lm)


@pytest.mark.parametrize("draft", [0, 4])
def test_switch_decides_on_the_jsd_of_the_capped_distributions(zoo, prompts, draft):
    s, t = zoo["student"], zoo["teacher"]
    cfg = SamplingConfig(max_new_tokens=8, seed=3)
    params = {"tau0": 0.1, "decay": 0.0, "draft_tokens": draft}
    out = generate(s, prompts, "switch", teacher=t, config=cfg, params=params, pad_id=0, eos_id=None)
    raw_gap = 0.0
    for p, r, st in zip(prompts, out.responses, out.stats):
        ids, at = list(p) + list(r)[:-1], slice(len(p) - 1, None)
        want = jsd(row_logprobs(t, ids)[at], row_logprobs(s, ids)[at])
        assert torch.allclose(torch.tensor(st["jsd"], dtype=torch.float64), want, atol=1e-5)
        raw_gap = max(raw_gap, float((jsd(row_logprobs(t, ids, True)[at], row_logprobs(s, ids, True)[at]) - want)
                                     .abs().max()))
    assert raw_gap > 0.01  # raw logits would have switched on other numbers


def test_scrg_corrects_where_the_capped_kl_is_largest(zoo, prompts):
    s, t, n = zoo["student"], zoo["teacher"], 8
    cfg = SamplingConfig(max_new_tokens=n, do_sample=False, temperature=0.0)
    out = generate(s, prompts, "scrg", teacher=t, config=cfg, params={"rounds": 1}, pad_id=0, eos_id=None)
    for p, r, st in zip(prompts, out.responses, out.stats):
        y = list(p)
        for _ in range(n):
            y.append(int(row_logprobs(s, y)[-1].argmax()))
        at = slice(len(p) - 1, len(y) - 1)
        lp, lq = row_logprobs(t, y)[at], row_logprobs(s, y)[at]
        d, top, resp = kl(lp, lq), lp.argmax(-1), torch.tensor(y[len(p):])
        cand = resp != top
        assert bool(cand.any())
        j = int(torch.where(cand, d, torch.full_like(d, float("-inf"))).argmax())
        assert st["correction_positions"] == [j]
        assert list(r)[:j] == y[len(p):len(p) + j] and r[j] == int(top[j])
