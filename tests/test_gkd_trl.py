"""GKD as TRL's ``GKDConfig`` runs it: the recipe's defaults, ``seq_kd`` (``policy.off_policy: teacher``) and
dropout disabled in the student (``disable_dropout``).

References (huggingface/trl, commit f2cd577): trl/experimental/gkd/gkd_config.py:55-102 (the defaults),
trl/experimental/gkd/gkd_trainer.py:202-204 (``disable_dropout_in_model(self.model)``), :216-224 (generation
kwargs: ``do_sample``, ``top_k`` 0, ``top_p`` 1.0), :501-528 (``training_step``: student coin first, ``elif seq_kd``
the teacher generates, else gold), trl/trainer/utils.py:182-185 (``disable_dropout_in_model``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmdistill.errors import ConfigError
from lmdistill.generation import SamplingConfig, generate
from lmdistill.teachers import LocalTeacher
from lmdistill.train import load_config
from lmdistill.train.setup import load_student
from lmdistill.train.sources import make_sequence_source

MODELS = ["student=S", "teacher=T"]


def run(models, tokenizer, prompts, policy, teacher="teacher", params=None, **cfg):
    """``policy`` with its ``params`` (a mapping of the policy's fields) and the sampling settings ``cfg``."""
    cfg.setdefault("max_new_tokens", 10)
    gold = cfg.pop("gold", None)
    return generate(models["student"], prompts, policy, teacher=models[teacher] if teacher else None, gold=gold,
                    config=SamplingConfig(**cfg), params=params, pad_id=tokenizer.pad_token_id,
                    eos_id=tokenizer.eos_token_id)


# ---------------------------------------------------------------- the recipe

def test_recipe_resolves_to_trl_gkdconfig_defaults():
    """gkd_config.py:55-102: temperature 0.9, lmbda 0.5, beta 0.5, max_new_tokens 128, disable_dropout True,
    seq_kd False; gkd_trainer.py:216-224 samples with top_k 0 and top_p 1.0; the loss is called without a
    temperature (gkd_trainer.py:422-428, so 1)."""
    cfg = load_config("gkd", MODELS)
    s, policy = cfg.sampling, cfg.policy
    ours = {"temperature": s["temperature"], "lmbda": policy["student_prob"], "beta": cfg.objective[0]["beta"],
            "max_new_tokens": s["max_new_tokens"], "disable_dropout": cfg.disable_dropout,
            "seq_kd": policy["off_policy"] == "teacher"}
    assert ours == {"temperature": 0.9, "lmbda": 0.5, "beta": 0.5, "max_new_tokens": 128, "disable_dropout": True,
                    "seq_kd": False}
    assert s["top_k"] == 0 and s["top_p"] == 1.0 and s["do_sample"] and policy["coin"] == "batch"
    assert [e["term"] for e in cfg.objective] == ["jsd"] and cfg.objective[0].get("temperature", 1.0) == 1.0
    gkd = pytest.importorskip("trl.experimental.gkd")   # the installed TRL's own defaults, when it is there
    theirs = {f.name: f.default for f in dataclasses.fields(gkd.GKDConfig) if f.name in ours}
    assert theirs == ours


def test_seq_kd_override_and_bad_values():
    assert load_config("gkd", [*MODELS, "policy.off_policy=teacher"]).policy["off_policy"] == "teacher"
    with pytest.raises(ConfigError, match=r"policy.off_policy: must be 'gold' or 'teacher'.*got 'student'"):
        load_config("gkd", [*MODELS, "policy.off_policy=student"])
    with pytest.raises(ConfigError, match="disable_dropout"):
        load_config("gkd", [*MODELS, "disable_dropout=maybe"])


# ---------------------------------------------------------------- seq_kd: who writes the off-policy batch

def test_seq_kd_off_policy_batch_is_the_teachers_sample(models, tokenizer, prompts):
    """The coin off (lambda 0): with seq_kd the batch is the teacher's sample, token for token the ``teacher``
    policy's for the same seed, tagged teacher; without it, the gold responses."""
    gold = [[5, 6, 7, tokenizer.eos_token_id], [8] * 3, [9, 9], [9, tokenizer.eos_token_id]]
    for seed in (0, 3):
        teacher = run(models, tokenizer, prompts, "teacher", seed=seed, temperature=0.9)
        off = run(models, tokenizer, prompts, "mixed", seed=seed, temperature=0.9, gold=gold,
                  params={"student_prob": 0.0, "off_policy": "teacher"})
        assert off.responses == teacher.responses and torch.equal(off.sources, teacher.sources)
        assert [s["origin"] for s in off.stats] == ["teacher"] * 4
        assert off.responses != gold
        plain = run(models, tokenizer, prompts, "mixed", seed=seed, gold=gold, params={"student_prob": 0.0})
        assert plain.responses == gold


def test_seq_kd_coin_on_gives_the_students_sample(models, tokenizer, prompts):
    """gkd_trainer.py:501: the student's coin is tried first, so seq_kd changes only the batches that lose it."""
    gold = [[5, 6, tokenizer.eos_token_id]] * 4
    student = run(models, tokenizer, prompts, "student", seed=4, temperature=0.9)
    on = run(models, tokenizer, prompts, "mixed", seed=4, temperature=0.9, gold=gold,
             params={"student_prob": 1.0, "off_policy": "teacher"})
    assert on.responses == student.responses and [s["origin"] for s in on.stats] == ["student"] * 4
    kinds = set()
    for seed in range(16):   # lambda 0.5, one coin per batch: all student or all teacher, never gold
        args = dict(seed=seed, temperature=0.9)
        out = run(models, tokenizer, prompts, "mixed", gold=gold, params={"student_prob": 0.5, "off_policy": "teacher"},
                  **args)
        (kind,) = {s["origin"] for s in out.stats}
        assert out.responses == run(models, tokenizer, prompts, kind, **args).responses
        kinds.add(kind)
    assert kinds == {"student", "teacher"}


def test_seq_kd_needs_a_local_teacher(models, tokenizer, prompts):
    gold = [[5, tokenizer.eos_token_id]] * 4
    with pytest.raises(ConfigError, match="policy 'mixed' needs a teacher model"):
        run(models, tokenizer, prompts, "mixed", teacher=None, gold=gold, params={"off_policy": "teacher"})
    alone = run(models, tokenizer, prompts, "mixed", teacher=None, gold=gold,
                params={"off_policy": "teacher", "student_prob": 1.0}, seed=1)   # the coin never fails: no teacher
    assert {s["origin"] for s in alone.stats} == {"student"}
    seq_sft = ["objective=[{term: seq_sft, weight: 1}]", "policy.off_policy=teacher"]
    with pytest.raises(ConfigError, match=r"teacher: is required \(policy mixed read"):
        load_config("gkd", ["student=S", *seq_sft])
    assert load_config("gkd", ["student=S", "objective=[{term: seq_sft, weight: 1}]"]).teacher == ""
    for spec in ("openai:t@http://127.0.0.1:9/v1", "cache:/nonexistent"):
        with pytest.raises(ConfigError, match="policy mixed needs its next-token distribution at every generated step"):
            load_config("gkd", [f"student=S", f"teacher={spec}", "policy.off_policy=teacher"])


def test_trainer_source_builds_the_teachers_batch(models, tokenizer, prompts, model_dirs):
    """The trainer's sequence source with the gkd recipe and seq_kd on: the built batch is the teacher policy's
    sample at the recipe's temperature 0.9 and the step's seed."""
    from lmdistill.data.tokenize import TokenizedExample
    from lmdistill.train.data_order import step_seed

    cfg = load_config("gkd", [f"student={model_dirs['student']}", f"teacher={model_dirs['teacher']}",
                              "policy.off_policy=teacher", "policy.student_prob=0",
                              "sampling.max_new_tokens=9"])
    rows = [TokenizedExample(str(i), p, [5, tokenizer.eos_token_id]) for i, p in enumerate(prompts)]
    batch = make_sequence_source(cfg).build(rows, step=3, micro=1, rank=0, student=models["student"],
                                            teacher=LocalTeacher(models["teacher"]), tokenizer=tokenizer)
    ref = run(models, tokenizer, prompts, "teacher", seed=step_seed(cfg.seed, 3, 0, 1), temperature=0.9,
              max_new_tokens=9)
    assert [r.response_ids for r in batch.rows] == ref.responses
    assert {s["origin"] for s in batch.row_stats} == {"teacher"}


# ---------------------------------------------------------------- dropout

def _dropout_models(root):
    """A Llama whose only dropout is the attention modules' float ``attention_dropout`` (no ``nn.Dropout``), and a
    GPT-2 whose dropouts are ``nn.Dropout`` modules (embeddings, attention, residual)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.5,
                                         attn_implementation="eager"))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, attn_pdrop=0.5,
                                      resid_pdrop=0.5, embd_pdrop=0.5))
    out = {}
    for name, model in (("llama", llama), ("gpt2", gpt2)):
        model.save_pretrained(str(root / name))
        out[name] = str(root / name)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("lora", [False, True])
def test_disable_dropout_gives_identical_train_mode_logits(tmp_path, arch, lora):
    """``disable_dropout=true``: the loaded student, in train mode, gives the same logits twice (dropout really
    off, LoRA's dropout included, as TRL disables every dropout of the whole model); ``false``: they differ."""
    if lora:
        pytest.importorskip("peft")
    path = _dropout_models(tmp_path)[arch]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    extra = [f"lora={lora}", "lora_dropout=0.5", "lora_targets=[c_attn]" if arch == "gpt2" else "lora_r=4"]
    for disable in (False, True):
        cfg = load_config("gkd", [f"student={path}", "teacher=T", f"disable_dropout={disable}", *extra])
        model = load_student(cfg, "cpu")
        assert model.training
        torch.manual_seed(2)
        a = model(input_ids=ids).logits
        b = model(input_ids=ids).logits
        model.eval()
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        if disable:
            assert torch.equal(a, b) and torch.allclose(a, ref, atol=1e-6)
            assert a.requires_grad   # still a training forward
        else:
            assert not torch.allclose(a, b)


def test_gkd_trains_with_seq_kd_and_dropout_off(model_dirs, tokenizer, tmp_path):
    """``lmdistill train gkd`` end to end with seq_kd on (lambda 0: every batch is the teacher's sample, as
    ``test_trainer_source_builds_the_teachers_batch`` checks) and a student whose attention dropout is 0.5: it
    trains, and the exported student has its dropout off."""
    import json

    from transformers import AutoConfig, LlamaForCausalLM

    from lmdistill.train import train

    config = AutoConfig.from_pretrained(model_dirs["student"])
    config.attention_dropout = 0.5
    student = LlamaForCausalLM.from_pretrained(model_dirs["student"], config=config)
    student.save_pretrained(str(tmp_path / "student"))
    tokenizer.save_pretrained(str(tmp_path / "student"))
    cfg = load_config("gkd", [f"student={tmp_path / 'student'}", f"teacher={model_dirs['teacher']}",
                              f"output_dir={tmp_path / 'run'}", "max_train_examples=8", "batch_size=4",
                              "micro_batch_size=2", "max_steps=2", "sampling.max_new_tokens=6",
                              "policy.student_prob=0", "policy.off_policy=teacher", "valid_data=",
                              "save_steps=1000", "eval_steps=1000", "progress=false", "max_length=96",
                              "max_prompt_length=80", "device=cpu"])
    result = train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    exported = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert exported["attention_dropout"] == 0.0 and result["final"]
