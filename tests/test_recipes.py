"""Recipes: built-ins shipped in the package as deltas over one base, the objective as registered terms, one
sampling config, --print-config, the old flat format refused with its translation, a new term without a trainer
edit, callbacks, and the built wheel training from another folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from lmdistill.cli import main
from lmdistill.errors import ConfigError
from lmdistill.losses import forward_kl
from lmdistill.losses import objective as objective_mod
from lmdistill.losses.term import Term
from lmdistill.train import Callback, load_config, train
from lmdistill.train.recipe_compat import translate_old
from lmdistill.train.recipes import RECIPES_DIR, builtin_recipes
from lmdistill.train.sources import policy_params

BUILTINS = ["distillm", "gkd", "gold", "imitkd", "kd", "mgsr", "minillm", "minitron", "opd", "seqkd", "sft", "switch",
            "uld"]
MODELS = ["student=S", "teacher=T"]


def models_for(name: str) -> list[str]:
    """The cross-tokenizer recipes read their teacher aligned by bytes: ``teacher=xtok:PATH``."""
    return ["student=S", "teacher=xtok:T"] if name in ("gold", "uld") else MODELS


def test_builtin_recipes_live_in_the_package_as_deltas_over_base():
    assert builtin_recipes() == BUILTINS
    base = yaml.safe_load((RECIPES_DIR / "base.yaml").read_text())
    for name in BUILTINS:
        own = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
        same = {k for k in set(own) & (set(base) - {"sampling"}) if own[k] == base[k]}
        assert not same, f"{name} repeats base keys with their base values: {same}"   # a delta only changes
        cfg = load_config(name, models_for(name))
        assert cfg.lr == own.get("lr", base["lr"]) and cfg.max_steps == base["max_steps"] and cfg.method == name
        own_tokens = own.get("sampling", {}).get("max_new_tokens", base["sampling"]["max_new_tokens"])
        assert cfg.sampling["max_new_tokens"] == own_tokens   # gkd: TRL GKDConfig's 128


@pytest.mark.parametrize("name", BUILTINS)
def test_print_config_is_a_recipe_that_resolves_to_the_same_config(name, tmp_path, capsys):
    # opd refuses a top-p filter (the tokens' sampling distribution must be the student's, tempered at most)
    overrides = [*models_for(name), "max_steps=7", "sampling.temperature=0.9" if name == "opd" else "sampling.top_p=0.9"]
    assert main(["train", name, *overrides, "--print-config"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "resolved.yaml"
    path.write_text(printed)
    assert load_config(path) == load_config(name, overrides)
    assert yaml.safe_load(printed)["max_steps"] == 7


def test_objective_overrides_edit_add_and_refuse():
    cfg = load_config("kd", [*MODELS, "objective.fkl.weight=0.7", "objective.fkl.temperature=2.0",
                             "objective.span.weight=0.1"])
    assert cfg.objective == [{"term": "sft", "weight": 0.5}, {"term": "fkl", "weight": 0.7, "temperature": 2.0},
                             {"term": "span", "weight": 0.1}]
    with pytest.raises(ConfigError, match=r"no term named 'fk' \(it has sft, fkl; terms to add: sft, seq_sft"):
        load_config("kd", [*MODELS, "objective.fk.weight=1"])
    with pytest.raises(ConfigError, match=r"objective\[1\] \(fkl\): unknown parameter\(s\) beta; valid: temperature"):
        load_config("kd", [*MODELS, "objective.fkl.beta=0.5"])
    with pytest.raises(ConfigError, match="every weight is 0"):
        load_config("kd", [*MODELS, "objective.fkl.weight=0", "objective.sft.weight=0"])
    with pytest.raises(ConfigError, match=r"teacher: is required \(term fkl read the teacher\)"):
        load_config("kd", ["student=S"])
    # two entries of one term need distinct names
    with pytest.raises(ConfigError, match="two entries are named 'fkl'"):
        load_config("kd", [*MODELS, "objective=[{term: fkl}, {term: fkl, temperature: 2}]"])
    two = load_config("kd", [*MODELS, "objective=[{term: fkl}, {term: fkl, name: hot, temperature: 2}]"])
    assert [e.get("name", e["term"]) for e in two.objective] == ["fkl", "hot"]


def test_sampling_is_the_generation_config():
    cfg = load_config("switch", [*MODELS, "policy.tau0=inf", "sampling.max_new_tokens=9"])
    sc, params = cfg.sampling_config(5), policy_params(cfg.policy)
    assert params.tau0 == float("inf") and sc.max_new_tokens == 9 and sc.seed == 5 and params.decay == 0.01
    with pytest.raises(ConfigError, match=r"policy: unknown parameter 'tau'; did you mean 'tau0'\?"):
        load_config("switch", [*MODELS, "policy.tau=0.1"])
    with pytest.raises(ConfigError, match="sampling.seed: is set by the trainer"):
        load_config("switch", [*MODELS, "sampling.seed=3"])
    with pytest.raises(ConfigError, match=r"sampling: top_p must be in \(0, 1\]"):
        load_config("switch", [*MODELS, "sampling.top_p=2"])


OLD_MGSR = """method: mgsr
policy: scrg
n_corrections: 2
loss: dac_kl
dac_kl: {top_k: 64}
span_weight: 0.5
span_prior: word
sft_weight: 1.0
kd_weight: 1.0
tau0: 0.4
max_new_tokens: 32
"""


def test_old_format_is_refused_with_its_translation(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(OLD_MGSR)
    with pytest.raises(ConfigError) as err:
        load_config(old, MODELS)
    msg = str(err.value)
    assert "old recipe format" in msg and "n_corrections" in msg
    # the message's YAML is the new recipe: saved under the old keys' remaining ones, it loads and means the same
    new = yaml.safe_load(msg.split("Write instead:\n", 1)[1])
    assert new["objective"] == [{"term": "sft", "weight": 1.0}, {"term": "dac_kl", "weight": 1.0, "top_k": 64},
                                {"term": "span", "weight": 0.5, "prior": "word"}]
    assert new["sampling"] == {"max_new_tokens": 32}
    assert {k: new["policy"].get(k) for k in ("name", "rounds")} == {"name": "scrg", "rounds": 2}  # its policy
    fixed = tmp_path / "new.yaml"
    fixed.write_text(yaml.safe_dump({"method": "mgsr", "policy": "scrg", **new}))
    cfg = load_config(fixed, MODELS)
    assert cfg.policy["name"] == "scrg" and cfg.policy["rounds"] == 2 and cfg.objective[1]["top_k"] == 64
    with pytest.raises(ConfigError, match=r"policy.tau0=0.1 on the command line \(with policy=switch\)"):
        load_config("switch", [*MODELS, "tau0=0.1"])
    with pytest.raises(ConfigError, match="objective.sft.weight=0.5"):
        load_config("kd", [*MODELS, "kd_weight=0.5"])
    assert translate_old({"loss": "jsd", "loss_params": {"beta": 0.9}, "kd_weight": 1.0, "sft_weight": 0.0}) == \
        {"objective": [{"term": "jsd", "weight": 1.0, "beta": 0.9}]}


def test_a_recipe_may_extend_another(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: gkd\npolicy: {student_prob: 0.9}\nmax_steps: 3\n")
    cfg = load_config(mine, MODELS)
    assert cfg.policy["name"] == "mixed" and cfg.policy["student_prob"] == 0.9 and cfg.max_steps == 3
    assert cfg.objective == load_config("gkd", MODELS).objective and cfg.lr == 5e-4
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(loop, MODELS)


class HalfKL(Term):
    """A test-only term: 0.5 * forward KL, registered with one line."""

    needs_teacher = True

    def __init__(self, *, scale: float = 0.5):
        super().__init__()
        self.scale = scale

    def forward(self, inputs):
        return self.scale * forward_kl(inputs.student_logits, inputs.teacher_logits, inputs.logits_mask)


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_step_begin(self, run, step):
        self.calls.append(("begin", step))

    def on_sequences(self, run, step, seqs):
        self.calls.append(("sequences", step, len(seqs.rows)))

    def on_step_end(self, run, step, metrics):
        self.calls.append(("end", step, "loss" in metrics))


def test_a_new_term_trains_without_a_trainer_edit_and_callbacks_fire(model_dirs, tmp_path, monkeypatch):
    monkeypatch.setitem(objective_mod.TERMS, "half_kl", HalfKL)   # the one registry line
    common = [f"student={model_dirs['student']}", f"teacher={model_dirs['teacher']}", "max_train_examples=8",
              "batch_size=4", "micro_batch_size=2", "valid_data=", "max_steps=2", "save_steps=100",
              "eval_steps=100", "progress=false", "max_length=96", "max_prompt_length=80", "device=cpu"]
    rec = Recorder()
    half = train(load_config("kd", [*common, f"output_dir={tmp_path / 'half'}", "objective.fkl.weight=0",
                                    "objective.half_kl.weight=1.0"]), callbacks=[rec])
    full = train(load_config("kd", [*common, f"output_dir={tmp_path / 'full'}", "objective.fkl.weight=0.5"]))
    rows = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    # 1.0 * (0.5 KL) is 0.5 * KL: the same objective, the same step
    assert rows("half")[0]["loss"] == pytest.approx(rows("full")[0]["loss"], rel=1e-6)
    assert rows("half")[0]["loss/half_kl"] == pytest.approx(0.5 * rows("full")[0]["loss/fkl"], rel=1e-6)
    assert rec.calls == [("begin", 0), ("sequences", 0, 2), ("sequences", 0, 2), ("end", 0, True),
                         ("begin", 1), ("sequences", 1, 2), ("sequences", 1, 2), ("end", 1, True)]
    assert Path(half["final"]).exists() and Path(full["final"]).exists()


@pytest.mark.slow
def test_built_wheel_trains_a_builtin_recipe_from_any_folder(model_dirs, tmp_path):
    """`pip install` of the built wheel, then `lmdistill train gkd ...` from an unrelated folder."""
    root = Path(__file__).resolve().parents[1]
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(root)], check=True)
    wheel = next(wheels.glob("lmdistill-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lmdistill/recipes/gkd.yaml" in names and "lmdistill/recipes/base.yaml" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import lmdistill; print(lmdistill.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(target)), where
    out = subprocess.run([sys.executable, "-m", "lmdistill", "train", "gkd", f"student={model_dirs['student']}",
                          f"teacher={model_dirs['teacher']}", "output_dir=run", "max_steps=1", "batch_size=2",
                          "micro_batch_size=2", "max_train_examples=4", "valid_data=", "sampling.max_new_tokens=4",
                          "max_length=96", "max_prompt_length=80", "progress=false", "device=cpu"],
                         cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (elsewhere / "run" / "final" / "model.safetensors").exists()
    assert json.loads((elsewhere / "run" / "config.json").read_text())["objective"] == [
        {"term": "jsd", "weight": 1.0, "beta": 0.5}]
    # the console script the wheel declares
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "lmdistill = lmdistill.cli:run" in zipfile.ZipFile(wheel).read(entry[0]).decode()
