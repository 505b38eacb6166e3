"""Cross-tokenizer distillation end to end (issue 32, item 1): how a teacher of another tokenizer is chosen
(``teacher=xtok:...``) or refused, `train uld` / `train gold` lowering the held-out cross-tokenizer divergence, a served
teacher scoring the teacher-side tokens, and a captured cache of the teacher's tokens, byte ends and top-k."""

from __future__ import annotations

import json

import pytest
import torch

from lmdistill.data import load_examples
from lmdistill.errors import ConfigError
from lmdistill.losses.uld import GOLDTerm, ULDTerm
from lmdistill.models import build_model, load_model
from lmdistill.models.tokenizer import train_sp_tokenizer
from lmdistill.teachers import open_teacher
from lmdistill.train import load_config, train
from test_cross_tokenizer import inputs, rows_of


@pytest.fixture(scope="module")
def sp_tok():
    return train_sp_tokenizer()


@pytest.fixture(scope="module")
def sp_teacher(tmp_path_factory, sp_tok):
    """A micro teacher model whose tokenizer is a SentencePiece-style BPE (``train_sp_tokenizer``)."""
    path = tmp_path_factory.mktemp("sp") / "teacher"
    build_model("micro", path, tokenizer=sp_tok, seed=1)
    return str(path)


# ------------------------------------------------------------------------------------------------ choosing the kind
def settings_for(model_dirs, teacher, out, *extra):
    return [f"student={model_dirs['student']}", f"teacher={teacher}", f"output_dir={out}", "max_train_examples=16",
            "batch_size=4", "micro_batch_size=4", "valid_data=", "eval_steps=1000", "save_steps=1000",
            "progress=false", "max_length=96", "max_prompt_length=80", "device=cpu", "sampling.max_new_tokens=8",
            *extra]


def test_a_teacher_is_aligned_only_when_named_xtok(model_dirs, sp_teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"term uld needs .*teacher=xtok:PATH"):
        load_config("uld", settings_for(model_dirs, sp_teacher, tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"term fkl needs its full next-token distribution"):
        load_config("kd", settings_for(model_dirs, f"xtok:{sp_teacher}", tmp_path / "b"))
    with pytest.raises(ConfigError, match=r"teacher_tokenizer: teacher=xtok:openai:t@http://127.0.0.1:1/v1 needs"):
        load_config("uld", settings_for(model_dirs, "xtok:openai:t@http://127.0.0.1:1/v1", tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"term gold needs its full distributions .*a cross_tokenizer teacher gives "
                                          r"its top-k on its own tokens"):
        load_config("gold", settings_for(model_dirs, "xtok:openai:t@http://127.0.0.1:1/v1", tmp_path / "d",
                                         f"teacher_tokenizer={sp_teacher}"))
    with pytest.raises(ConfigError, match=r"term uld reads the teacher on sequences made during training"):
        load_config("uld", settings_for(model_dirs, f"xtok:cache:{tmp_path}", tmp_path / "e"))
    with pytest.raises(ConfigError, match=r"teacher_template: is read only with a cross-tokenizer teacher"):
        load_config("kd", settings_for(model_dirs, model_dirs["teacher"], tmp_path / "f", "teacher_template=chat"))


def test_a_local_teacher_with_another_tokenizer_is_refused_with_the_way_to_use_it(model_dirs, sp_teacher, tmp_path):
    cfg = load_config("kd", settings_for(model_dirs, sp_teacher, tmp_path / "kd"))
    with pytest.raises(ConfigError, match=r"tokenizers differ at id 0: .* teacher=xtok:PATH, .*: uld, gold;"):
        train(cfg)


# ------------------------------------------------------------------------------------------------ end to end
def heldout(student_dir, teacher_spec, tokenizer, term, **options) -> float:
    """The cross-tokenizer divergence on 8 held-out Dolly rows (validation split)."""
    teacher = open_teacher(teacher_spec, tokenizer=tokenizer, **options)
    with torch.no_grad():
        return float(term(inputs(load_model(student_dir), teacher, rows_of(tokenizer, 8, "dolly:valid"), tokenizer)))


@pytest.mark.parametrize("recipe", ["uld", "gold"])
def test_train_with_a_teacher_of_another_tokenizer_lowers_the_heldout_divergence(recipe, model_dirs, sp_teacher,
                                                                                 tokenizer, tmp_path):
    """The recipe's policy (one coin per batch: the student's samples re-tokenized for the teacher, or gold) runs
    against a teacher whose tokenizer shares no special token and few pieces with the student's."""
    term = ULDTerm() if recipe == "uld" else GOLDTerm()
    before = heldout(model_dirs["student"], f"xtok:{sp_teacher}", tokenizer, term)
    cfg = load_config(recipe, settings_for(model_dirs, f"xtok:{sp_teacher}", tmp_path / recipe, "max_steps=6",
                                           "lr=5e-2", "seed=1"))
    out = train(cfg)
    lines = [json.loads(x) for x in (tmp_path / recipe / "metrics.jsonl").read_text().splitlines()]
    origins = {x.get("gen/teacher_fraction") for x in lines}   # the mixed policy's coin: 1 gold batch, 0 samples
    assert {0.0, 1.0} <= origins and all(f"loss/{recipe}" in x for x in lines if "step" in x)
    after = heldout(out["final"], f"xtok:{sp_teacher}", tokenizer, term)
    assert after < 0.8 * before, (before, after)


# ------------------------------------------------------------------------------------------------ served teacher
@pytest.fixture(scope="module")
def sp_server(sp_teacher):
    """``lmdistill serve`` for the SentencePiece-tokenizer teacher (log-probabilities up to its whole vocabulary)."""
    from lmdistill.models import load_model_and_tokenizer
    from lmdistill.serve import ServerThread, create_app

    model, tok = load_model_and_tokenizer(sp_teacher)
    with ServerThread(create_app(model, tok, model_name="sp", max_logprobs=len(tok))) as srv:
        yield srv


@pytest.mark.parametrize("merge", ["observed", "bayesian"])
def test_served_uld_equals_the_local_one_when_k_covers_the_vocabulary(sp_server, sp_teacher, sp_tok, model_dirs,
                                                                     tokenizer, merge):
    """The server scores the teacher-side tokens (top K and each token's own log-probability); with K = V the
    sorted L1 on K listed entries plus the tail mass is the dense one; with K = 8 it can only be lower."""
    spec = f"xtok:openai:sp@{sp_server.base_url}"
    local = heldout(model_dirs["student"], f"xtok:{sp_teacher}", tokenizer, ULDTerm(merge=merge))
    full = heldout(model_dirs["student"], spec, tokenizer, ULDTerm(merge=merge), teacher_tokenizer=sp_teacher,
                   top_k=len(sp_tok))
    assert abs(full - local) < 1e-4, (full, local)
    few = heldout(model_dirs["student"], spec, tokenizer, ULDTerm(merge=merge), teacher_tokenizer=sp_teacher,
                  top_k=8)
    assert few <= local + 1e-5 and few < local - 1e-3


def test_train_uld_against_a_served_teacher_of_another_tokenizer(sp_server, sp_teacher, model_dirs, tmp_path):
    cfg = load_config("uld", settings_for(model_dirs, f"xtok:openai:sp@{sp_server.base_url}", tmp_path / "run",
                                          "max_steps=2", "teacher_top_k=16", f"teacher_tokenizer={sp_teacher}"))
    out = train(cfg)
    assert (tmp_path / "run" / "teacher_scores.jsonl").stat().st_size > 0 and out["steps"] == 2


# ------------------------------------------------------------------------------------------------ cache
def test_a_captured_cache_gives_the_served_scores_and_trains(sp_teacher, sp_tok, model_dirs, tokenizer, tmp_path):
    """``lmdistill capture --student`` stores the teacher's tokens, their byte ends, top-k and own log-probabilities
    per student row; ``xtok:cache:DIR`` then gives the local teacher's ULD (K = V), reruns keep every shard, a
    changed shard is named, and a `uld` run on gold responses trains from it."""
    from lmdistill.cli import main

    cache = tmp_path / "cache"
    args = ["capture", "--teacher", sp_teacher, "--student", model_dirs["student"], "--data", "dolly:valid",
            "--limit", "8", "--top-k", str(len(sp_tok)), "--out", str(cache), "--max-prompt-length", "80",
            "--max-length", "96", "--template", "chat", "--shard-rows", "4", "--logprob-dtype", "float32",
            "--no-progress"]
    assert main(args) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["shards"] == 2 and manifest["teacher_template"] == "alpaca"
    expect = dict(dolly_expect(tokenizer, manifest))
    local = heldout(model_dirs["student"], f"xtok:{sp_teacher}", tokenizer, ULDTerm())
    cached = heldout(model_dirs["student"], f"xtok:cache:{cache}", tokenizer, ULDTerm(), expect=lambda m: expect)
    assert abs(cached - local) < 1e-5, (cached, local)
    assert main(args) == 0 and json.loads((cache / "manifest.json").read_text())["shards_reused"] == 2
    cfg = load_config("uld", settings_for(model_dirs, f"xtok:cache:{cache}", tmp_path / "run", "max_steps=2",
                                          "data=dolly:valid", "max_train_examples=8", "policy=gold",
                                          "template=chat"))
    assert train(cfg)["steps"] == 2
    (cache / "shard-00001.npz").write_bytes(b"not a shard")
    with pytest.raises(ConfigError, match=r"shard-00001.npz .*rerun its capture command"):
        heldout(model_dirs["student"], f"xtok:cache:{cache}", tokenizer, ULDTerm())
    assert main(args) == 0 and json.loads((cache / "manifest.json").read_text())["shards_reused"] == 1


def dolly_expect(tokenizer, manifest) -> dict:
    """What a run with these settings expects of a cache (``train/setup.py`` ``cache_expects``)."""
    from lmdistill.teachers import examples_hash, tokenizer_hash

    data = load_examples("dolly:valid").examples[: manifest["limit"] or None]
    return {"tokenizer_hash": tokenizer_hash(tokenizer), "template": "chat", "max_prompt_length": 80,
            "max_length": 96, "data_hash": examples_hash(data)}
