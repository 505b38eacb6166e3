"""SCRG with a teacher that scores whole sequences (a served teacher, ``SequenceScorer`` in ``policies/scrg.py``).

With K covering the vocabulary the sparse forward KL on K + 1 bins is the dense KL and the listed argmax is the
teacher's argmax, so in float64 the served path writes exactly the tokens of the local (streaming) path: asserted
here against an in-process scorer, and end to end through ``lmdistill serve`` and ``teacher=openai:...`` training.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from lmdistill.errors import ConfigError
from lmdistill.generation import SamplingConfig, generate
from lmdistill.losses.sparse import SparseTeacher, top_k_teacher
from lmdistill.teachers.served import ServedTeacher
from lmdistill.train import load_config, train

N = 16


class ModelScorer:
    """A sequence scorer over a local model: the teacher's top-``k`` at the wanted positions, as a server gives it
    (each sequence scored alone, unpadded)."""

    vocab = None

    def __init__(self, model, k: int):
        self.model, self.k, self.temperature, self.calls = model, k, 1.0, 0

    def sequence_scores(self, seqs, wanted) -> SparseTeacher:
        parts = []
        for seq, pos in zip(seqs, wanted):
            if not pos:
                continue
            self.calls += 1
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([seq])).logits[0]
            rows = logits[torch.tensor(pos) - 1]          # position t is scored by the logits at t - 1
            parts.append(top_k_teacher(rows, self.k, self.temperature))
        return SparseTeacher.concat(parts)


@pytest.fixture(scope="module")
def f64(models):
    return {k: copy.deepcopy(models[k]).double() for k in ("student", "teacher")}


def run(ms, teacher, prompts, tokenizer, rounds=None, **kw):
    """SCRG with ``teacher``: a model (the streaming scorer) or a scorer of whole sequences (``scorer=``)."""
    cfg = SamplingConfig(**{"max_new_tokens": N, "seed": 3, **kw})
    where = {"teacher": teacher} if isinstance(teacher, torch.nn.Module) else {"scorer": teacher}
    return generate(ms["student"], prompts, "scrg", config=cfg, params=None if rounds is None else {"rounds": rounds},
                    pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, **where)


@pytest.mark.parametrize("kw", [{}, {"do_sample": False}, {"rounds": 2}, {"no_repeat_ngram_size": 2},
                                {"rounds": 3, "no_repeat_ngram_size": 3}],
                         ids=["sampled", "greedy", "two-rounds", "ban-2", "three-rounds-ban-3"])
def test_full_k_scorer_writes_the_local_paths_tokens_float64(f64, tokenizer, prompts, kw):
    local = run(f64, f64["teacher"], prompts, tokenizer, **kw)
    scorer = ModelScorer(f64["teacher"], len(tokenizer))
    served = run(f64, scorer, prompts, tokenizer, **kw)
    assert served.responses == local.responses
    assert torch.equal(served.sources, local.sources)
    assert [s["correction_positions"] for s in served.stats] == [s["correction_positions"] for s in local.stats]
    assert any(s["correction_positions"] for s in local.stats)       # the test exercises corrections
    assert scorer.calls >= len(prompts)


def test_small_k_corrects_with_listed_ids_only(f64, tokenizer, prompts):
    """With K = 4 every correction writes one of the teacher's 4 most likely tokens at that position."""
    scorer = ModelScorer(f64["teacher"], 4)
    out = run(f64, scorer, prompts, tokenizer, rounds=1)
    fixed = 0
    for b, s in enumerate(out.stats):
        for j in s["correction_positions"]:
            seq = list(prompts[b]) + out.responses[b]
            with torch.no_grad():
                logits = f64["teacher"](input_ids=torch.tensor([seq[:len(prompts[b]) + j]])).logits[0, -1]
            assert out.responses[b][j] in logits.topk(4).indices.tolist()
            fixed += 1
    assert fixed


def test_policies_that_need_teacher_tokens_refuse_a_scorer(f64, tokenizer, prompts):
    scorer = ModelScorer(f64["teacher"], 8)
    for policy in ("switch", "teacher", "teacher_mix"):
        with pytest.raises(ConfigError, match="needs a teacher model .*a served teacher only scores whole sequences"):
            generate(f64["student"], prompts, policy, scorer=scorer, config=SamplingConfig(max_new_tokens=4),
                     pad_id=tokenizer.pad_token_id)
    # a policy that does not use the teacher ignores it
    generate(f64["student"], prompts, "student", scorer=scorer, config=SamplingConfig(max_new_tokens=4),
             pad_id=tokenizer.pad_token_id)


def test_a_scorer_at_another_temperature_is_refused(f64, tokenizer, prompts):
    with pytest.raises(ConfigError, match="temperature"):
        run(f64, ModelScorer(f64["teacher"], 8), prompts, tokenizer, temperature=0.7)


# ---------------------------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def server(teacher_server):
    return teacher_server


def test_served_teacher_scrg_corrects_where_the_teacher_disagrees_most(server, models, tokenizer, prompts):
    """``lmdistill serve`` as the scorer, K = V, float32 over HTTP: each row's correction is at a position of (within
    rounding) the largest KL among those where its token is not the teacher's argmax, and writes that argmax. (Exact
    token identity with the local path is the float64 test above; in float32 the server's forward and ours round
    differently, which can decide between near-equal KLs of this random micro model.)"""
    teacher = ServedTeacher.from_spec(f"openai:teacher@{server.base_url}", top_k=len(tokenizer), api="echo")
    before = run(models, models["teacher"], prompts, tokenizer, do_sample=False, rounds=0)
    served = run(models, teacher, prompts, tokenizer, do_sample=False)
    assert teacher.requests >= len(prompts)
    corrected = 0
    for b, stats in enumerate(served.stats):
        if not stats["correction_positions"]:
            continue
        (j,) = stats["correction_positions"]
        orig = before.responses[b]
        seq = torch.tensor([list(prompts[b]) + orig])
        with torch.no_grad():
            p = torch.log_softmax(models["teacher"](input_ids=seq).logits[0].double(), -1)
            q = torch.log_softmax(models["student"](input_ids=seq).logits[0, :, :len(tokenizer)].double(), -1)
        start = len(prompts[b]) - 1
        p, q = p[start:start + len(orig)], q[start:start + len(orig)]
        kl = (p.exp() * (p - q)).sum(-1)
        cand = [t for t in range(len(orig)) if orig[t] != int(p[t].argmax())]
        assert served.responses[b][:j] == orig[:j] and served.responses[b][j] == int(p[j].argmax())
        assert j in cand and float(kl[j]) >= max(float(kl[t]) for t in cand) - 1e-4
        corrected += 1
    assert corrected


def cfg(model_dirs, teacher, out, *extra):
    return load_config("distillm", [f"student={model_dirs['student']}", f"teacher={teacher}", f"output_dir={out}",
                                    "policy.generator=scrg", "valid_data=dolly:valid", "eval_limit=2",
                                    "policy.init_threshold=0.9", "policy.capacity=4", "max_train_examples=8",
                                    "batch_size=4", "micro_batch_size=2", "save_steps=100", "eval_steps=1000",
                                    "progress=false", "max_length=96", "max_prompt_length=80", "device=cpu",
                                    "max_steps=3", "sampling.max_new_tokens=8", *extra])


def test_training_with_scrg_and_a_served_teacher(server, model_dirs, tmp_path, tokenizer):
    """DistiLLM's replay filled by SCRG-revised samples, the teacher only on the server: it trains, the served
    teacher scored the samples (SCRG) and the training positions, and the logs show corrections."""
    out = tmp_path / "served"
    result = train(cfg(model_dirs, f"openai:teacher@{server.base_url}", out, "teacher_top_k=16"))
    assert (Path(result["final"]) / "model.safetensors").exists()
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("replay/fresh", 0) > 0 for row in logged)
    assert any("gen/regenerated_tokens" in row for row in logged)
    assert (out / "teacher_scores.jsonl").read_text().splitlines()


def test_config_allows_scrg_only_among_generating_policies(model_dirs, tmp_path):
    base = [f"student={model_dirs['student']}", "teacher=openai:t@http://127.0.0.1:9/v1", f"output_dir={tmp_path}",
            "valid_data=dolly:valid"]
    load_config("distillm", base + ["policy.generator=scrg"])
    load_config("kd", base + ["policy=scrg"])
    with pytest.raises(ConfigError, match="policy switch needs its next-token distribution at every generated step; "
                                          "a served teacher gives"):
        load_config("kd", base + ["policy=switch"])
    with pytest.raises(ConfigError, match="temperature 1"):
        load_config("kd", base + ["policy=scrg", "sampling.temperature=0.7"])
    with pytest.raises(ConfigError, match="holds only the sequences it was captured on"):
        load_config("kd", [f"student={model_dirs['student']}", "teacher=cache:/nonexistent", f"output_dir={tmp_path}",
                           "policy=scrg"])


def test_generate_cli_runs_scrg_with_a_served_teacher(server, model_dirs, tmp_path, capsys):
    from lmdistill.cli import main

    out = tmp_path / "scrg.jsonl"
    argv = ["generate", "--policy", "scrg", "--student", str(model_dirs["student"]), "--teacher",
            f"openai:teacher@{server.base_url}", "--teacher-top-k", "8", "--data", "dolly:train", "--limit", "4",
            "--max-new-tokens", "8", "--batch-size", "2", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) >= 3 and any(2 in r["sources"] for r in rows)      # 2 = a corrected token (one prompt is filtered)
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["teacher_top_k"] == 8
    capsys.readouterr()
    assert main([*argv[:2], "switch", *argv[3:-2], "--out", str(tmp_path / "sw.jsonl")]) != 0
    assert "policy switch needs its next-token distribution at every generated step; a served teacher gives" \
        in capsys.readouterr().err
