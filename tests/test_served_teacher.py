"""A served teacher (`teacher=openai:NAME@URL`): training with no teacher in the process, through `lmdistill serve`'s
completions endpoint, equals training with the teacher loaded, when K covers the vocabulary; a resumed run asks the
server only for what it has not seen."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lmdistill.data import collate_for_training, load_examples, tokenize_examples
from lmdistill.errors import ConfigError
from lmdistill.losses.model_forward import selected_logits
from lmdistill.losses.sparse import top_k_teacher
from lmdistill.models import load_model_and_tokenizer
from lmdistill.teachers.served import ServedTeacher, tail_log_mass, top_k_rows
from lmdistill.train import load_config, train


@pytest.fixture(scope="module")
def server(teacher_server):
    return teacher_server


def spec(server) -> str:
    return f"openai:teacher@{server.base_url}"


@pytest.mark.parametrize("api", ["echo", "prompt_logprobs"])
def test_served_scores_equal_the_teachers_top_k(server, model_dirs, tokenizer, api):
    rows, _ = tokenize_examples(load_examples("dolly:train").examples[:4], tokenizer, max_prompt_length=80,
                                max_length=96)
    batch = collate_for_training(rows, tokenizer.pad_token_id)
    teacher = ServedTeacher.from_spec(spec(server), top_k=8, api=api)
    got = teacher.top_k(rows, batch)
    model, _ = load_model_and_tokenizer(model_dirs["teacher"])
    with torch.no_grad():
        want = top_k_teacher(selected_logits(model, batch, batch["loss_mask"][:, 1:]), 8)
    assert torch.equal(got.ids, want.ids)
    assert torch.allclose(got.logprobs, want.logprobs, atol=1e-4)
    assert torch.allclose(got.rest.exp(), want.rest.exp(), atol=1e-4)


def gkd(model_dirs, teacher, out, *extra, recipe="gkd"):
    cfg = load_config(recipe, [f"student={model_dirs['student']}", f"teacher={teacher}", f"output_dir={out}",
                              "max_train_examples=8", "batch_size=4", "micro_batch_size=2", "valid_data=",
                              "save_steps=2", "eval_steps=1000", "progress=false", "max_length=96",
                              "max_prompt_length=80", "device=cpu", "max_steps=3", "sampling.max_new_tokens=8",
                              *extra])
    return cfg


#: DistiLLM's fresh student samples (policy replay) with a small buffer and its threshold up, so it samples.
REPLAY = ["valid_data=dolly:valid", "eval_limit=2", "policy.init_threshold=0.9", "policy.capacity=4"]


@pytest.mark.parametrize("recipe,extra", [("gkd", []), ("distillm", REPLAY)])
def test_a_served_teacher_trains_like_the_local_teacher(server, model_dirs, tmp_path, tokenizer, recipe, extra):
    full = [f"teacher_top_k={len(tokenizer)}"]
    local = train(gkd(model_dirs, model_dirs["teacher"], tmp_path / "local", *extra, recipe=recipe))
    served = train(gkd(model_dirs, spec(server), tmp_path / "served", *full, *extra, recipe=recipe))
    a = load_file(os.path.join(local["final"], "model.safetensors"))
    b = load_file(os.path.join(served["final"], "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    if recipe == "distillm":   # the served teacher scored fresh student samples
        logged = [json.loads(x) for x in (tmp_path / "served" / "metrics.jsonl").read_text().splitlines()]
        assert any(row.get("replay/fresh", 0) > 0 for row in logged)
    scores = (tmp_path / "served" / "teacher_scores.jsonl").read_text().splitlines()
    assert scores and all(json.loads(x)["key"] for x in scores)


def test_a_resumed_run_asks_only_for_new_sequences(server, model_dirs, tmp_path, tokenizer):
    cfg = gkd(model_dirs, spec(server), tmp_path / "run", "teacher_top_k=16")
    train(cfg)
    seen = len((tmp_path / "run" / "teacher_scores.jsonl").read_text().splitlines())
    from lmdistill.train.run import Run

    run = Run(cfg, resume=str(sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[0]))
    run.step(run.state["step"])      # this step was scored before: its sequences are the same, every answer comes from the cache
    assert run.teacher.requests == 0
    assert len((tmp_path / "run" / "teacher_scores.jsonl").read_text().splitlines()) == seen


def test_methods_that_need_a_local_teacher_say_so(model_dirs, tmp_path):
    base = [f"student={model_dirs['student']}", "teacher=openai:t@http://127.0.0.1:9/v1", f"output_dir={tmp_path}",
            "valid_data=dolly:valid"]
    for recipe in ("switch", "mgsr", "minillm", "seqkd"):
        with pytest.raises(ConfigError, match="needs its (full )?next-token distribution at every "
                                              "(generated step|position); a served teacher gives"):
            load_config(recipe, base)
    with pytest.raises(ConfigError, match="temperature 1.0"):
        load_config("kd", base + ["objective.fkl.temperature=2.0"])
    with pytest.raises(ConfigError, match="openai:MODEL@BASE_URL"):
        load_config("kd", [f"student={model_dirs['student']}", "teacher=openai:nourl", f"output_dir={tmp_path}"])


def test_top_k_rows_pads_with_unused_ids_and_the_tail_holds_the_rest():
    positions = [None, {5: -0.1, 7: -3.0}, {1: -0.5, 2: -1.5, 3: -2.0}]
    ids, lps = top_k_rows(positions, [1, 2], 3)
    assert ids == [[5, 7, 0], [1, 2, 3]]
    assert lps[0][:2] == [-0.1, -3.0] and lps[0][2] == float("-inf")
    rest = tail_log_mass(torch.tensor(lps))
    assert rest[1].exp().item() == pytest.approx(1 - sum(torch.tensor(lps[1]).exp().tolist()), abs=1e-6)
    with pytest.raises(ConfigError, match="position 0"):
        top_k_rows(positions, [0], 3)


def test_a_top_k_covering_the_vocabulary_leaves_no_tail():
    """float32 log-probabilities of a whole vocabulary sum to 1 only to rounding: no spurious tail bucket (it made
    forward KL ~6% too high against a teacher listing every id); a real remainder is kept."""
    torch.manual_seed(0)
    full = torch.log_softmax(torch.randn(4, 4096) * 3, -1)          # float32, as a server sends them
    assert torch.isneginf(tail_log_mass(full)).all()
    top = full.topk(64, -1).values
    expected = torch.log1p(-top.double().exp().sum(-1)).float()
    assert torch.allclose(tail_log_mass(top), expected, atol=1e-6)
