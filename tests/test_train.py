"""The trainer: every recipe trains on the micro models, exact resume after kill -9, two processes, errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmdistill.cli import main
from lmdistill.errors import ConfigError, LmdistillError
from lmdistill.train import TrainingError, load_config, train

RECIPES = ["sft", "kd", "seqkd", "imitkd", "gkd", "distillm", "minillm", "mgsr", "switch"]


@pytest.fixture(scope="module")
def dirs(model_dirs, tmp_path_factory):
    """The micro student, and a teacher SFT-trained on Dolly by our trainer (a random teacher teaches nothing)."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config("sft", [f"student={model_dirs['teacher']}", f"output_dir={out}", "max_train_examples=64",
                              "max_steps=40", "lr=1e-2", "batch_size=8", "micro_batch_size=8", "valid_data=",
                              "progress=false", "max_length=96", "max_prompt_length=80", "save_steps=1000",
                              "eval_steps=1000", "device=cpu"])
    return {**model_dirs, "teacher": train(cfg)["final"]}


#: Per-recipe overrides the short test runs need: DistiLLM's threshold starts at 0 (pure KD until the validation
#: loss rises), so the tests start it at 0.5 with a small buffer to exercise generation and replay.
REPLAY_EXTRA = {"valid_data": "dolly:valid", "eval_limit": 4, "eval_steps": 2, "policy.init_threshold": 0.5,
                "policy.capacity": 4}
RECIPE_EXTRA = {"distillm": REPLAY_EXTRA, "mgsr": REPLAY_EXTRA}
VALIDATES_FIRST = set(RECIPE_EXTRA)   # policy: replay validates before the first step (finetune.py:266)


def base_overrides(model_dirs, out, recipe=None, **extra):
    o = {"student": model_dirs["student"], "teacher": model_dirs["teacher"], "output_dir": str(out),
         "max_train_examples": 8, "batch_size": 4, "micro_batch_size": 2, "sampling.max_new_tokens": 12,
         "valid_data": "", "save_steps": 1000, "eval_steps": 1000, "progress": False, "max_length": 96,
         "max_prompt_length": 80, "device": "cpu", **RECIPE_EXTRA.get(recipe, {})}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def teacher_distance(student_dir, teacher_dir, tokenizer, template="alpaca"):
    """Forward KL(teacher || student) and SFT loss on a fixed gold batch (prompts in ``template``)."""
    from lmdistill.data import collate_for_training, load_examples, tokenize_examples
    from lmdistill.losses import forward_kl, sft_loss
    from lmdistill.models import load_model
    from lmdistill.losses.model_forward import forward_logits, shifted

    rows, _ = tokenize_examples(load_examples("dolly:train").examples[:16], tokenizer, template=template,
                                max_prompt_length=80, max_length=96)
    b = collate_for_training(rows, tokenizer.pad_token_id)
    s, t = load_model(student_dir), load_model(teacher_dir)
    labels, mask = shifted(b)
    with torch.no_grad():
        sl, tl = forward_logits(s, b)[:, :-1], forward_logits(t, b)[:, :-1]
        return float(forward_kl(sl, tl, mask)), float(sft_loss(sl, labels, mask))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_and_exports(recipe, dirs, tokenizer, tmp_path):
    cfg = load_config(recipe, base_overrides(dirs, tmp_path, recipe, max_steps=6, lr=5e-3, warmup_steps=0))
    result = train(cfg)   # resolves template auto (chat: both tokenizers have one): measured on the prompts it trained on
    before = teacher_distance(dirs["student"], dirs["teacher"], tokenizer, cfg.template)
    after = teacher_distance(result["final"], dirs["teacher"], tokenizer, cfg.template)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = [0] if recipe in VALIDATES_FIRST else []
    assert [r["step"] for r in rows] == first + list(range(1, 7))
    rows = [r for r in rows if r["step"] > 0]
    assert all(r["loss"] == r["loss"] for r in rows)
    if recipe in ("sft", "seqkd"):
        assert after[1] < before[1], (recipe, before, after)      # cross-entropy on gold goes down
    else:
        assert after[0] < before[0], (recipe, before, after)      # closer to the teacher
    if recipe in ("switch",):
        assert "gen/teacher_fraction" in rows[-1] or any(k.startswith("gen/") for k in rows[-1])
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (Path(result["final"]) / "config.json").exists()


def test_validation_selects_best_and_lora_exports_merged(dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = load_config("kd", base_overrides(dirs, tmp_path, max_steps=4, eval_steps=2, valid_data="dolly:valid",
                                           eval_limit=4, eval_max_new_tokens=8, lora=True, lora_r=4, lr=1e-2))
    result = train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val/rougeL" in r]
    assert [r["step"] for r in vals] == [2, 4]
    assert all(0 <= r["val/rougeL"] <= 100 and r["val/loss"] > 0 for r in vals)
    best = max(vals, key=lambda r: r["val/rougeL"])
    assert result["best_step"] == best["step"] and result["best_rougeL"] == pytest.approx(best["val/rougeL"])
    for name in ("final", "best"):
        folder = tmp_path / name
        assert not (folder / "adapter_config.json").exists()       # LoRA merged on export
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert not any("lora" in k for k in model.state_dict())
    base = weights(dirs["student"])
    final = weights(tmp_path / "final")
    assert any(not torch.equal(base[k], final[k]) for k in base if "proj" in k)   # the adapters changed the weights


def test_loss_goes_down_on_fixed_batch(dirs, tmp_path):
    cfg = load_config("kd", base_overrides(dirs, tmp_path, max_steps=8, lr=1e-2, batch_size=4,
                                           max_train_examples=4, micro_batch_size=4))
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # every step sees the same 4 examples: the objective must fall
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.9


@pytest.mark.parametrize("recipe", ["kd", "seqkd"])
def test_chunked_loss_trains_like_the_direct_path(recipe, dirs, tmp_path):
    finals = {}
    for chunked in (False, True):
        cfg = load_config(recipe, base_overrides(dirs, tmp_path / str(chunked), max_steps=3, lr=5e-3,
                                                 chunked_loss=chunked))
        finals[chunked] = weights(train(cfg)["final"])
    a, b = finals[False], finals[True]
    # Adam divides each gradient by its running RMS, so a near-zero gradient entry whose float32 rounding differs
    # between the two paths can move by a visible part of one step (lr 5e-3); 1e-4 absolute is 2% of a step.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match=r"chunked_loss: term\(s\) dac_kl, span have no chunked form"):
        load_config("mgsr", base_overrides(dirs, tmp_path, chunked_loss=True))


@pytest.mark.parametrize("recipe", ["kd", "gkd", "seqkd", "distillm", "switch"])
def test_trained_positions_only_equal_full_logits(recipe, dirs, tokenizer):
    """The fast path (LM head on trained positions only) gives the same terms and gradients as full logits."""
    from lmdistill.data import collate_for_training, load_examples, tokenize_examples
    from lmdistill.losses.objective import Objective
    from lmdistill.losses.term import TermInputs
    from lmdistill.models import load_model

    cfg = load_config(recipe, base_overrides(dirs, "/tmp/unused", recipe, **{"objective.sft.weight": 0.5,
                                                                      "objective.seq_sft.weight": 0.3}))
    rows, _ = tokenize_examples(load_examples("dolly:train").examples[:6], tokenizer, max_prompt_length=80,
                                max_length=96)
    gold = collate_for_training(rows, tokenizer.pad_token_id)
    seq = collate_for_training(rows[::-1], tokenizer.pad_token_id)
    from lmdistill.teachers import LocalTeacher

    student, teacher = load_model(dirs["student"], trainable=True), LocalTeacher(load_model(dirs["teacher"]))
    objective = Objective(cfg.objective)
    results = []
    for whole in (True, False):
        student.zero_grad()
        terms = objective(TermInputs(student, teacher, gold, seq, same=False, whole=whole, rows=rows[::-1],
                                     tokenizer=tokenizer, sampling=cfg.sampling_config(0)))
        sum(v for v, _ in terms.values()).backward()
        results.append(({k: float(v.detach()) for k, (v, _) in terms.items()},
                        [p.grad.clone() for p in student.parameters()]))
    (full, g_full), (fast, g_fast) = results
    assert full.keys() == fast.keys() and len(full) >= 2
    for k in full:
        assert fast[k] == pytest.approx(full[k], rel=1e-5, abs=1e-7)
    for a, b in zip(g_full, g_fast):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def run_cli(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmdistill", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.parametrize("recipe", ["gkd", "distillm", "minillm"])
def test_kill9_and_resume_is_bit_exact(recipe, dirs, tmp_path):
    common = base_overrides(dirs, tmp_path / "x", recipe, max_steps=8, save_steps=2, keep_checkpoints=2)
    full = tmp_path / "full"
    p = run_cli(["train", recipe, *common, f"output_dir={full}"])
    assert p.wait(timeout=300) == 0, p.stdout.read()
    # same run, killed with SIGKILL after its second checkpoint, then resumed
    part = tmp_path / "part"
    p = run_cli(["train", recipe, *common, f"output_dir={part}"])
    deadline = time.time() + 300
    while not (part / "checkpoints" / "step-0000004" / "DONE").exists():
        assert time.time() < deadline and p.poll() is None, "run ended before the kill"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (part / "final").exists()
    p = run_cli(["train", recipe, *common, f"output_dir={part}", "--resume"])
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    a, b = weights(full / "final"), weights(part / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    first = [0] if recipe in VALIDATES_FIRST else []
    assert steps == first + list(range(1, 9))  # no duplicated or lost metric lines


@pytest.mark.slow
def test_two_processes_match_one(dirs, tmp_path):
    common = base_overrides(dirs, tmp_path, max_steps=4, batch_size=4, micro_batch_size=2)
    one = tmp_path / "one"
    p = run_cli(["train", "kd", *common, f"output_dir={one}"])
    assert p.wait(timeout=300) == 0, p.stdout.read()
    two = tmp_path / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "lmdistill", "train", "kd", *common, f"output_dir={two}", "micro_batch_size=1"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    a, b = weights(one / "final"), weights(two / "final")
    # same global batch and token-weighted objective: equal up to float summation order
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_config_errors(model_dirs, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown key 'max_step'; did you mean 'max_steps'\?"):
        load_config("kd", [f"student={model_dirs['student']}", f"teacher={model_dirs['teacher']}", "max_step=3"])
    with pytest.raises(ConfigError, match=r"key 'max_steps' must be int, got str 'ten'"):
        load_config("kd", [f"student={model_dirs['student']}", f"teacher={model_dirs['teacher']}", "max_steps=ten"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: kd\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'learning_rate'"):
        load_config(bad, [f"student={model_dirs['student']}"])
    with pytest.raises(ConfigError, match="teacher: is required"):
        load_config("kd", [f"student={model_dirs['student']}"])
    with pytest.raises(ConfigError, match=r"objective\[0\] \(jsd\): divergence 'jsd': beta must be in \[0, 1\]"):
        load_config("gkd", [f"student={model_dirs['student']}", f"teacher={model_dirs['teacher']}",
                            "objective.jsd.beta=2.0"])
    # the CLI prints one line and exits 2, before any model loads
    assert main(["train", "kd", "student=x", "teacher=y", "lr=fast"]) == 2
    assert "key 'lr' must be float" in capsys.readouterr().err


#: Numbers a recipe or override may not hold: the key named, at load, before any model loads.
BAD_NUMBERS = [
    ("lr=inf", r"^lr: must be a finite number >= 0, got inf$"),
    ("lr=.nan", r"^lr: must be a finite number >= 0, got nan$"),
    ("weight_decay=-0.1", r"^weight_decay: must be a finite number >= 0"),
    ("clip_grad=.inf", r"^clip_grad: must be a finite number >= 0, got inf"),
    ("warmup_ratio=1.5", r"^warmup_ratio: must be a finite number in \[0, 1\], got 1.5"),
    ("lora_dropout=1", r"^lora_dropout: must be a finite number in \[0, 1\), got 1.0"),
    ("policy=replay policy.init_threshold=2", r"^policy.init_threshold: must be in \[0, 1\], got 2"),
    ("policy=replay policy.threshold_step=.nan", r"^policy.threshold_step: must be in \[0, 1\], got nan"),
    ("policy=replay policy.loss_eps=-inf", r"^policy.loss_eps: must be a finite number >= 0, got -inf"),
    ("log_steps=0", r"^log_steps: must be an integer >= 1, got 0"),
    ("keep_checkpoints=-1", r"^keep_checkpoints: must be an integer >= 0, got -1"),
    ("max_bad_steps=0", r"^max_bad_steps: must be an integer >= 1"),
    ("max_train_examples=-1", r"^max_train_examples: must be an integer >= 0, got -1"),
    ("max_prompt_length=512", r"^max_prompt_length \(512\) must be < max_length \(512\)"),
    ("sampling.temperature=inf", r"^sampling: temperature must be >= 0 \(0 = greedy\), got inf"),
    ("sampling.top_p=.nan", r"^sampling: top_p must be in \(0, 1\], got nan"),
    ("policy=mixed policy.student_prob=2", r"^policy.student_prob: must be in \[0, 1\], got 2"),
    ("policy=switch policy.tau0=.nan", r"^policy.tau0: must be a number"),
    ("policy=switch policy.decay=.inf", r"^policy.decay: must be a finite number >= 0, got inf"),
    ("policy=teacher_mix policy.alpha=-0.5", r"^policy.alpha: must be in \[0, 1\]"),
    ("policy=replay policy.capacity=0", r"^policy.capacity: must be an integer >= 1, got 0"),
    ("policy=replay policy.generator=nope", r"^policy.generator: must name an engine policy"),
    ("objective.fkl.temperature=.inf", r"^objective\[1\] \(fkl\): temperature must be a positive finite number"),
    ("objective.fkl.weight=.nan", r"^objective\[1\]: weight must be a finite number >= 0, got nan"),
    ("objective.jsd.beta=.nan", r"^objective\[2\] \(jsd\): divergence 'jsd': beta must be in \[0, 1\], got nan"),
    ("objective.dac_kl.sharpness=.inf", r"^objective\[2\] \(dac_kl\): DACKL .*sharpness a finite number > 0"),
    ("objective.dac_kl.coverage_weight=nan", r"^objective\[2\] \(dac_kl\): coverage_weight must be a number"),
    ("objective.dac_kl.init_bounds=.nan", r"^objective\[2\] \(dac_kl\): init_bounds must be a pair"),
    ("objective.pg_rkl.clip=.nan", r"^objective\[2\] \(pg_rkl\): clip must be in \[0, 1\)"),
    ("objective.pg_rkl.reward_scaling=.inf", r"^objective\[2\] \(pg_rkl\): reward_scaling"),
]


@pytest.mark.parametrize("override,message", BAD_NUMBERS, ids=[o for o, _ in BAD_NUMBERS])
def test_config_refuses_non_finite_and_out_of_range_numbers(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("kd", ["student=s", "teacher=t", *override.split()])


def test_text_keys_take_the_override_as_typed(tmp_path):
    """mixed_precision=no on the command line is the text "no" (YAML alone reads it as False); in a recipe file an
    unquoted no is refused with the key's name and a hint to quote it."""
    assert load_config("kd", ["student=s", "teacher=t", "mixed_precision=no"]).mixed_precision == "no"
    assert load_config("kd", ["student=s", "teacher=t", "teacher_dtype=float32"]).teacher_dtype == "float32"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: kd\nmixed_precision: no\n")
    with pytest.raises(ConfigError, match=r"'mixed_precision' must be str, got bool False \(YAML reads"):
        load_config(str(recipe), ["student=s", "teacher=t"])


def test_config_number_errors_are_one_line_on_the_cli(capsys):
    assert main(["train", "kd", "student=s", "teacher=t", "lr=inf"]) == 2
    assert capsys.readouterr().err == "error: lr: must be a finite number >= 0, got inf\n"


@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["0-bytes", "blank-lines"])
@pytest.mark.parametrize("key", ["data", "valid_data"])
def test_an_empty_data_file_says_so(model_dirs, tmp_path, key, content):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    cfg = load_config("sft", base_overrides(model_dirs, tmp_path / "out", max_steps=1, **{key: str(empty)}))
    with pytest.raises(LmdistillError, match=rf"^{re.escape(str(empty))}: the file is empty$"):
        train(cfg)


def test_an_empty_json_file_says_so(tmp_path):
    from lmdistill.data import load_examples

    for content, message in (("", "the file is empty"), (" \n", "the file is empty"),
                             ("[]", r"holds no rows \(an empty JSON list\)")):
        f = tmp_path / "rows.json"
        f.write_text(content)
        with pytest.raises(LmdistillError, match=rf"rows.json: {message}$"):
            load_examples(f)


def test_tokenizer_mismatch_is_refused(model_dirs, tmp_path, tokenizer):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(model_dirs["teacher"], other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a = next(t for t, i in vocab.items() if i == 300)
    b = next(t for t, i in vocab.items() if i == 301)
    vocab[a], vocab[b] = 301, 300          # same tokens, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tj))
    cfg = load_config("kd", base_overrides(model_dirs, tmp_path / "o", teacher=str(other), max_steps=1))
    with pytest.raises(ConfigError, match=rf"differ at id 300: student {a!r}, teacher {b!r}"):
        train(cfg)


def test_nan_steps_are_skipped_then_stop(model_dirs, tmp_path, monkeypatch):
    from lmdistill.losses.objective import Objective

    real = Objective.forward
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        terms = real(*a, **k)
        if calls["n"] > 4:     # two micro-batches a step: steps 1-2 are good, then NaN forever
            return {n: (v * float("nan"), c) for n, (v, c) in terms.items()}
        return terms

    monkeypatch.setattr(Objective, "forward", poisoned)
    cfg = load_config("kd", base_overrides(model_dirs, tmp_path, max_steps=50, save_steps=2))
    with pytest.raises(TrainingError, match=r"10 non-finite losses in a row .* last good checkpoint: .*step-0000002"):
        train(cfg)
    ckpt = tmp_path / "checkpoints" / "step-0000002"
    state = torch.load(ckpt / "student.pt")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_length_ordered_micro_batches_train_the_same_objective(model_dirs, tmp_path):
    """micro_batch_order=length cuts the step's rows, sorted by length, into micro-batches: less padding computed,
    the same token-weighted objective, so the weights match one whole-batch forward up to float summation order."""
    from lmdistill.train.trainer import Callback

    class Widths(Callback):
        def __init__(self):
            self.seen = []

        def on_sequences(self, run, step, seqs):
            self.seen.append((step, seqs.batch["input_ids"].numel(), [len(r.input_ids) for r in seqs.rows]))

    finals, padded = {}, {}
    for name, extra in {"whole": ["micro_batch_size=8"], "data": ["micro_batch_size=2"],
                        "length": ["micro_batch_size=2", "micro_batch_order=length"]}.items():
        cb = Widths()
        cfg = load_config("sft", base_overrides(model_dirs, tmp_path / name, max_steps=3, batch_size=8,
                                                max_train_examples=32, teacher="", template="alpaca",
                                                **{"lr": 1e-2}) + extra)   # the rows the tolerance was set on
        finals[name] = weights(Path(train(cfg, callbacks=[cb])["final"]))
        padded[name] = sum(n for _, n, _ in cb.seen)
        if name == "length":   # within each step the rows come shortest first
            for step in range(3):
                lengths = [x for s, _, rows in cb.seen if s == step for x in rows]
                assert lengths == sorted(lengths)
    assert padded["length"] < padded["data"] <= padded["whole"]
    for k in finals["whole"]:
        torch.testing.assert_close(finals["length"][k], finals["whole"][k], rtol=1e-4, atol=1e-5)


def test_training_rows_are_tokenized_once_per_process(model_dirs, tmp_path, monkeypatch):
    import lmdistill.train.setup as setup

    calls = []
    real = setup.tokenize_examples
    monkeypatch.setattr(setup, "tokenize_examples", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(setup, "_ROWS_MEMO", {})
    from lmdistill.models import load_tokenizer

    tok = load_tokenizer(model_dirs["student"])
    cfg = load_config("sft", base_overrides(model_dirs, tmp_path, teacher="", max_train_examples=16))
    first, _, reports = setup.load_rows(cfg, tok)
    again, _, reports2 = setup.load_rows(cfg, tok)
    assert len(calls) == 1 and [r.input_ids for r in again] == [r.input_ids for r in first] and reports2 == reports
    again.pop()                                              # the caller's list, not the memo's
    assert len(setup.load_rows(cfg, tok)[0]) == len(first) and len(calls) == 1
    shorter = load_config("sft", base_overrides(model_dirs, tmp_path, teacher="", max_train_examples=16,
                                                max_length=90))
    assert max(len(r.input_ids) for r in setup.load_rows(shorter, tok)[0]) <= 90 and len(calls) == 2
