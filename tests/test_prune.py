"""Structured pruning: Block Influence, Minitron channel importance, layer choice, pruned models, ``prune()``."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.errors import ConfigError
from lmdistill.models import build_model, count_parameters, load_model, load_tokenizer
from lmdistill.models.prune import (block_influence, calibration_batches, channel_importance, choose_layers, prune,
                                    prune_model)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer):
    """A tiny-student folder (4 layers, hidden 128, MLP 344)."""
    path = tmp_path_factory.mktemp("prune") / "student"
    build_model("tiny-student", path, tokenizer=tokenizer, seed=5)
    return str(path)


@pytest.fixture(scope="module")
def model(student_dir):
    return load_model(student_dir)


@pytest.fixture(scope="module")
def batches(tokenizer):
    out = calibration_batches(tokenizer, n_samples=8, max_length=96, batch_size=4, seed=0)
    assert any((b["attention_mask"] == 0).any() for b in out), "the tests need some padding"
    return out


def logits(m, batch):
    with torch.no_grad():
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def test_calibration_batches_are_right_padded_and_seeded(tokenizer, batches):
    assert [len(b["input_ids"]) for b in batches] == [4, 4]
    for b in batches:
        assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.long
        assert b["input_ids"].shape[1] <= 96
        lengths = b["attention_mask"].sum(1)
        for row, n in zip(b["attention_mask"], lengths):  # ones then zeros
            assert row[:n].all() and not row[n:].any()
        assert (b["input_ids"][b["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    again = calibration_batches(tokenizer, n_samples=8, max_length=96, batch_size=4, seed=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    other = calibration_batches(tokenizer, n_samples=8, max_length=96, batch_size=4, seed=1)
    assert not all(a["input_ids"].shape == b["input_ids"].shape and torch.equal(a["input_ids"], b["input_ids"])
                   for a, b in zip(batches, other))


def test_block_influence_matches_hidden_states_reference(model, batches):
    ref_model = copy.deepcopy(model)
    ref_model.model.norm = torch.nn.Identity()  # so the last hidden_states entry is the last layer's raw output
    n = ref_model.config.num_hidden_layers
    sums, count = torch.zeros(n, dtype=torch.float64), 0
    for b in batches:
        with torch.no_grad():
            hs = ref_model(**b, output_hidden_states=True, use_cache=False).hidden_states
        assert len(hs) == n + 1
        mask = b["attention_mask"].bool()
        count += int(mask.sum())
        for i in range(n):
            x, y = hs[i][mask].double(), hs[i + 1][mask].double()
            sums[i] += (torch.einsum("td,td->t", x, y) / (x.norm(dim=-1) * y.norm(dim=-1))).sum()
    expected = (1 - sums / count).tolist()
    got = block_influence(model, batches)
    assert got == pytest.approx(expected, abs=1e-6)
    assert all(0 < v < 2 for v in got)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1, 2, allow_nan=False), min_size=1, max_size=24), st.data())
def test_choose_layers_block_influence_drops_the_lowest(scores, data):
    n_keep = data.draw(st.integers(1, len(scores)))
    kept = choose_layers(scores, n_keep)
    assert len(kept) == n_keep and kept == sorted(set(kept))
    dropped = [i for i in range(len(scores)) if i not in kept]
    assert all(scores[d] <= scores[k] for d in dropped for k in kept)
    # ties: among equal scores the earlier layer is kept
    assert all(not (scores[d] == scores[k] and d < k) for d in dropped for k in kept)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.data())
def test_choose_layers_uniform_keeps_first_and_last(n, data):
    n_keep = data.draw(st.integers(1, n))
    kept = choose_layers([0.0] * n, n_keep, "uniform")
    assert len(kept) == n_keep and kept == sorted(set(kept)) and all(0 <= i < n for i in kept)
    assert kept[0] == 0
    if n_keep > 1:
        assert kept[-1] == n - 1
    assert choose_layers([0.0] * n, n, "uniform") == list(range(n))


def test_choose_layers_examples():
    assert choose_layers([0.3, 0.1, 0.2, 0.5], 2) == [0, 3]
    assert choose_layers([0.1, 0.1, 0.1], 2) == [0, 1]
    assert choose_layers([0.0] * 6, 3, "uniform") == [0, 2, 5]
    assert choose_layers([0.0] * 6, 1, "uniform") == [0]


def test_depth_identity_gives_identical_logits(model, batches):
    same = prune_model(model, keep_layers=list(range(model.config.num_hidden_layers)))
    assert same is not model
    for b in batches:
        assert torch.equal(logits(same, b), logits(model, b))


def test_depth_subset_equals_model_with_layers_removed_by_hand(model, batches):
    keep = [0, 2, 3]
    pruned = prune_model(model, keep_layers=keep)
    assert pruned.config.num_hidden_layers == 3 and len(pruned.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    by_hand = copy.deepcopy(model)
    by_hand.model.layers = torch.nn.ModuleList([by_hand.model.layers[i] for i in keep])
    for j, layer in enumerate(by_hand.model.layers):
        layer.self_attn.layer_idx = j
    by_hand.config.num_hidden_layers = 3
    for b in batches:
        torch.testing.assert_close(logits(pruned, b), logits(by_hand, b), atol=1e-6, rtol=0)
        assert not torch.allclose(logits(pruned, b), logits(model, b), atol=1e-3)
    # reordering is also honoured: new layer j is old layer keep[j]
    swapped = prune_model(model, keep_layers=[1, 0])
    assert torch.equal(swapped.model.layers[0].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


def test_pruned_model_keeps_ties_dtype_and_fixes_config(model):
    src = copy.deepcopy(model)
    src.config.layer_types = [f"kind{i}" for i in range(4)]
    src.config.quantization_config = {"quant_method": "fake"}
    pruned = prune_model(src, keep_layers=[1, 3], keep_channels=[torch.arange(10), torch.arange(10)])
    assert pruned.config.layer_types == ["kind1", "kind3"]
    assert not hasattr(pruned.config, "quantization_config")
    assert pruned.config.intermediate_size == 10 and src.config.intermediate_size == 344  # source untouched
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    assert not any(p.requires_grad for p in pruned.parameters()) and not pruned.training
    half = prune_model(src.to(torch.bfloat16), keep_layers=[0])
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert half.lm_head.weight.data_ptr() == half.model.embed_tokens.weight.data_ptr()


def test_width_all_channels_permuted_gives_identical_logits(model, batches):
    g = torch.Generator().manual_seed(0)
    size = model.config.intermediate_size
    same = prune_model(model, keep_channels=[torch.randperm(size, generator=g) for _ in range(4)])
    assert same.config.intermediate_size == size
    for b in batches:
        assert torch.equal(logits(same, b), logits(model, b))


def test_width_subset_equals_masked_activations(model, batches):
    g = torch.Generator().manual_seed(1)
    size, m = model.config.intermediate_size, 100
    keep = [torch.randperm(size, generator=g)[:m] for _ in range(4)]
    pruned = prune_model(model, keep_channels=keep)
    assert pruned.config.intermediate_size == m
    hidden = model.config.hidden_size
    for layer in pruned.model.layers:
        assert layer.mlp.gate_proj.weight.shape == layer.mlp.up_proj.weight.shape == (m, hidden)
        assert layer.mlp.down_proj.weight.shape == (hidden, m)
    for layer, old, idx in zip(pruned.model.layers, model.model.layers, keep):
        assert torch.equal(layer.mlp.down_proj.weight, old.mlp.down_proj.weight[:, idx.sort().values])

    def masker(mask):
        return lambda module, args: (args[0] * mask,)

    handles = []
    for layer, idx in zip(model.model.layers, keep):
        mask = torch.zeros(size)
        mask[idx] = 1
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(masker(mask)))
    try:
        for b in batches:
            torch.testing.assert_close(logits(pruned, b), logits(model, b), atol=1e-5, rtol=0)
    finally:
        for h in handles:
            h.remove()


def test_channel_importance_matches_per_example_reference(model, batches):
    got = channel_importance(model, batches)
    n, size = model.config.num_hidden_layers, model.config.intermediate_size
    assert len(got) == n and all(f.shape == (size,) for f in got)
    sq = torch.zeros(n, size, dtype=torch.float64)
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            ids = ids[: int(mask.sum())].unsqueeze(0)  # each example alone, unpadded
            inputs = {}
            handles = [layer.mlp.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
                       for i, layer in enumerate(model.model.layers)]
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            for h in handles:
                h.remove()
            for i, layer in enumerate(model.model.layers):
                mlp, x = layer.mlp, inputs[i][0].double()
                a = torch.nn.functional.silu(x @ mlp.gate_proj.weight.double().T) * (x @ mlp.up_proj.weight.double().T)
                sq[i] += a.abs().mean(0) ** 2
    for f, ref in zip(got, sq.sqrt()):
        torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-7)


def test_prune_end_to_end(student_dir, tmp_path, tokenizer):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    opts = dict(n_samples=8, max_length=96, batch_size=4, seed=0)
    info = prune(student_dir, out, layers=2, ffn_size=128, progress=False, **opts)
    assert not (out / "stale.txt").exists() and [p.name for p in tmp_path.iterdir()] == ["pruned"]
    assert json.loads((out / "prune.json").read_text()) == info
    assert (out / "generation_config.json").exists()

    teacher = load_model(student_dir)
    batches = calibration_batches(tokenizer, **opts)
    scores = block_influence(teacher, batches)
    assert info["block_influence"] == pytest.approx(scores, abs=1e-9)
    assert info["kept_layers"] == choose_layers(scores, 2)
    assert {k: info[k] for k in ("source", "method", "layers_before", "ffn_before", "ffn_size")} == {
        "source": student_dir, "method": "block-influence", "layers_before": 4, "ffn_before": 344, "ffn_size": 128}
    assert info["calibration"]["n_samples"] == 8 and info["calibration"]["data"] == "dolly"
    assert info["parameters_before"] == count_parameters(teacher)

    pruned, tok = load_model(str(out)), load_tokenizer(str(out))
    assert pruned.config.num_hidden_layers == 2 and pruned.config.intermediate_size == 128
    assert info["parameters_after"] == count_parameters(pruned) < info["parameters_before"]
    assert tok.get_vocab() == tokenizer.get_vocab()
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    # width importance is measured on the depth-pruned model
    shallow = prune_model(teacher, keep_layers=info["kept_layers"])
    keep = [torch.argsort(f, descending=True, stable=True)[:128] for f in channel_importance(shallow, batches)]
    expected = prune_model(shallow, keep_channels=keep)
    for b in batches:
        torch.testing.assert_close(logits(pruned, b), logits(expected, b), atol=1e-6, rtol=0)


def test_prune_uniform_depth_only(student_dir, tmp_path):
    info = prune(student_dir, tmp_path / "u", layers=2, method="uniform", n_samples=4, max_length=32, progress=False)
    assert info["kept_layers"] == [0, 3] and info["ffn_size"] == 344
    assert load_model(str(tmp_path / "u")).config.num_hidden_layers == 2


@pytest.mark.parametrize("kwargs,message", [
    ({"layers": 0}, "layers=0"), ({"layers": 5}, "layers=5"), ({"ffn_size": 0}, "ffn_size=0"),
    ({"ffn_size": 345}, "ffn_size=345"), ({"layers": 2, "method": "random"}, "unknown layer-selection method"),
    ({}, "layers and/or ffn_size"),
])
def test_prune_config_errors(student_dir, tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        prune(student_dir, tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_non_llama_models_are_refused(tmp_path, tokenizer, batches):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer), n_positions=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="not a Llama-style model"):
        prune(tmp_path / "gpt2", tmp_path / "out", layers=1, progress=False)
    for fn in (lambda: block_influence(gpt2, batches), lambda: channel_importance(gpt2, batches),
               lambda: prune_model(gpt2, keep_layers=[0])):
        with pytest.raises(ConfigError, match="not a Llama-style model"):
            fn()


def test_prune_model_rejects_bad_indices(model):
    for kwargs in ({"keep_layers": []}, {"keep_layers": [0, 0]}, {"keep_layers": [4]},
                   {"keep_channels": [torch.arange(5)] * 3}, {"keep_channels": [torch.tensor([0, 0])] * 4},
                   {"keep_channels": [torch.tensor([344])] * 4},
                   {"keep_channels": [torch.arange(5), torch.arange(6), torch.arange(5), torch.arange(5)]}):
        with pytest.raises(ConfigError):
            prune_model(model, **kwargs)
    with pytest.raises(ConfigError, match="between 1 and"):
        choose_layers([0.1, 0.2], 3)
