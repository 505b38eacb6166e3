"""Hidden-state terms (``hidden_cosine``, ``hidden_mse``) and the ``minitron`` recipe: float64 brute force against
HF's ``output_hidden_states``, the layer maps (the prune map against a hand-pruned model), gradients through the
projection, ModelOpt's balancer, one forward per model, the refusal of teachers without hidden states, and
``train minitron`` on a pruned student and on a pair of different widths (LoRA, gradient accumulation, FSDP2)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lmdistill.errors import ConfigError
from lmdistill.losses.hidden_states import pair_loss
from lmdistill.losses.layer_map import layer_map, uniform_pairs
from lmdistill.losses.model_forward import positions
from lmdistill.losses.objective import Objective, check_objective
from lmdistill.losses.term import TermContext, TermInputs
from lmdistill.models import build_model, load_model
from lmdistill.models.prune import prune, prune_model
from lmdistill.teachers import LocalTeacher
from lmdistill.train import load_config, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tokenizer):
    """A 4-block teacher of width 128 (``tiny-student`` size), and two students hand-pruned from it with
    ``models/prune.py``: blocks [0, 1] (a prefix: its blocks see the teacher's inputs) and [0, 3]."""
    root = tmp_path_factory.mktemp("wide")
    build_model("tiny-student", root / "teacher", tokenizer=tokenizer, seed=5)
    model = load_model(str(root / "teacher"))
    out = {"teacher": str(root / "teacher")}
    for name, kept in (("prefix", [0, 1]), ("skip", [0, 3])):
        student = prune_model(model, keep_layers=kept)
        student.save_pretrained(str(root / name))
        tokenizer.save_pretrained(str(root / name))
        (root / name / "prune.json").write_text(json.dumps({"kept_layers": kept, "layers_before": 4}))
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def batch(tokenizer):
    from lmdistill.data import collate_for_training, load_examples, tokenize_examples

    rows, _ = tokenize_examples(load_examples("dolly:train").examples[:8], tokenizer, template="alpaca",
                                max_prompt_length=80, max_length=96)
    assert len(rows) >= 4
    return rows, collate_for_training(rows, tokenizer.pad_token_id)


def objective(entries, student, teacher, path=""):
    return Objective(check_objective(entries), TermContext(student, LocalTeacher(teacher), path))


def inputs(student, teacher, batch, **kw):
    rows, b = batch
    return TermInputs(student, LocalTeacher(teacher), b, b, same=True, whole=False, rows=rows, **kw)


def hf_states(model, b):
    """HF's hidden states: ``embed`` = hidden_states[0], block i = hidden_states[i + 1] (not the last block),
    ``final`` = hidden_states[-1]."""
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                position_ids=positions(b["attention_mask"]), output_hidden_states=True)
    hs = out.hidden_states
    return {"embed": hs[0], "final": hs[-1], **{i: hs[i + 1] for i in range(len(hs) - 2)}}


def brute(kind, pairs, s_states, t_states, mask, proj=None):
    """The term by hand in float64: per pair, the rows at ``mask``; cos = x.y / (|x| |y|); mean over rows (and hidden
    units for MSE), then over pairs."""
    total = 0.0
    for s, t in pairs:
        x, y = s_states[s][mask].double(), t_states[t][mask].double()
        if proj is not None:
            x = x @ proj.weight.double().T + proj.bias.double()
        if kind == "cosine":
            cos = (x * y).sum(-1) / (x.pow(2).sum(-1).sqrt() * y.pow(2).sum(-1).sqrt())
            total += float((1 - cos).mean())
        else:
            total += float((x - y).pow(2).mean())
    return total / len(pairs)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
@pytest.mark.parametrize("where", ["trained", "all"])
def test_terms_equal_float64_brute_force(kind, where, model_dirs, wide, batch):
    """Both terms, both position sets, equal widths (micro models, no projection) and different widths (micro student,
    width-128 teacher: the projection), against HF's output_hidden_states by hand, in float64."""
    _, b = batch
    mask = b["attention_mask"].bool() if where == "all" else torch.cat(
        [b["loss_mask"][:, 1:], torch.zeros_like(b["loss_mask"][:, :1])], 1).bool()
    for teacher, width, block in ((model_dirs["teacher"], 24, 0), (wide["teacher"], 128, 2)):
        pairs = [["embed", "embed"], [0, block], ["final", "final"]]   # HF has no raw output of the last block
        s, t = load_model(model_dirs["student"]).double().eval(), load_model(teacher).double().eval()
        obj = objective([{"term": f"hidden_{kind}", "layers": pairs, "positions": where}], s, t).double()
        value = obj(inputs(s, t, batch))[f"hidden_{kind}"][0].detach()
        term = obj.terms[0]
        assert (term.projection is None) == (width == 24)
        with torch.no_grad():
            want = brute(kind, [tuple(p) for p in pairs], hf_states(s, b), hf_states(t, b), mask,
                         None if term.projection is None else term.projection[0])
        assert value.dtype == torch.float64 and float(value) == pytest.approx(want, rel=1e-10, abs=1e-12)
        assert float(value) > 1e-3   # two different models: the test can fail


def test_last_block_is_its_raw_output_and_final_its_norm(models, batch):
    """Hooks give the last block's output before the final norm, which HF's hidden_states replaces by the normed one."""
    _, b = batch
    m = models["teacher"].eval()
    last, final = LocalTeacher(m).layer_states(b, [1, "final"])
    with torch.no_grad():
        torch.testing.assert_close(m.model.norm(last), hf_states(m, b)["final"], rtol=0, atol=1e-6)
        torch.testing.assert_close(final, hf_states(m, b)["final"], rtol=0, atol=0)
        assert (last - final).abs().max() > 1e-2


def test_one_forward_per_model_and_the_same_values_on_every_path(models, batch):
    """With fkl and hidden_cosine, the student and the teacher each run one forward per micro-batch (the logit
    forward records the layers); the values equal the terms computed alone and on the chunked path."""
    s, t = models["student"], models["teacher"]
    calls = {"s": 0, "t": 0}
    hooks = [s.model.register_forward_hook(lambda *a: calls.__setitem__("s", calls["s"] + 1)),
             t.model.register_forward_hook(lambda *a: calls.__setitem__("t", calls["t"] + 1))]
    entries = [{"term": "hidden_cosine", "final": True}, {"term": "fkl"}]   # listed first: still computed last
    obj = objective(entries, s, t)
    try:
        both = obj(inputs(s, t, batch))
        assert calls == {"s": 1, "t": 1}
        alone = objective(entries[:1], s, t)(inputs(s, t, batch))   # a forward of its own for the layers
        chunked = obj(inputs(s, t, batch), chunked=True)
    finally:
        for h in hooks:
            h.remove()
    assert list(both) == ["hidden_cosine", "fkl"]
    for name in both:
        torch.testing.assert_close(chunked[name][0], both[name][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone["hidden_cosine"][0], both["hidden_cosine"][0], rtol=0, atol=1e-7)


def test_projection_gradients_float64(model_dirs, wide, batch):
    """Gradients through the shared projection (autograd against finite differences, float64), and a per-pair
    projection gets its own gradient per pair."""
    s, t = load_model(model_dirs["student"]).double().eval(), load_model(wide["teacher"]).double().eval()
    for kind in ("cosine", "mse"):
        obj = objective([{"term": f"hidden_{kind}", "layers": [[0, 1], [1, 3]], "final": True}], s, t).double()
        term, ins = obj.terms[0], inputs(s, t, batch)
        weight, bias = (p.detach().clone().requires_grad_() for p in term.projection[0].parameters())

        def loss(w, b_):
            return torch.func.functional_call(term, {"projection.0.weight": w, "projection.0.bias": b_}, (ins,))

        assert torch.autograd.gradcheck(loss, (weight, bias), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    per_pair = objective([{"term": "hidden_cosine", "layers": [[0, 1], [1, 3]], "shared_projection": False}],
                         s, t).double()
    per_pair(inputs(s, t, batch))["hidden_cosine"][0].backward()
    assert len(per_pair.terms[0].projection) == 2
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in per_pair.parameters())


def test_balancer_is_modelopts(models, batch):
    """balance_with: fkl gives the hidden term fkl's value and its own gradient times fkl/hidden (ModelOpt's
    LogitsAndIntermediatesLossBalancer, megatron.py:496-504), and is refused when it names no valid entry."""
    s, t = models["student"], models["teacher"]
    entries = [{"term": "fkl"}, {"term": "hidden_mse", "projection": "always"}]
    plain = objective(entries, s, t)
    torch.manual_seed(0)
    balanced = objective([entries[0], {**entries[1], "balance_with": "fkl"}], s, t)
    balanced.load_state_dict(plain.state_dict())
    raw = plain(inputs(s, t, batch))
    out = balanced(inputs(s, t, batch))
    fkl, hidden = float(raw["fkl"][0].detach()), float(raw["hidden_mse"][0].detach())
    assert float(out["hidden_mse"][0].detach()) == pytest.approx(fkl, rel=1e-6)
    assert float(balanced.unbalanced["hidden_mse"][0]) == pytest.approx(hidden, rel=1e-6)
    raw["hidden_mse"][0].backward()
    out["hidden_mse"][0].backward()
    for a, b in zip(plain.parameters(), balanced.parameters()):
        torch.testing.assert_close(b.grad, a.grad * (fkl / hidden), rtol=1e-5, atol=1e-9)
    for bad, why in (("nope", "nope"), ("hidden_mse", "hidden_mse")):
        with pytest.raises(ConfigError, match=f"balance_with must name another entry.*got '{why}'"):
            check_objective([entries[0], {**entries[1], "balance_with": bad}])


def test_layer_maps(wide, capsys):
    """uniform: t = floor((i+1) m / n + 1/2) - 1; prune: kept_layers of prune.json (the default when there is one);
    explicit pairs checked against both models; the run says which map it uses."""
    assert uniform_pairs(2, 4) == [(0, 1), (1, 3)]
    assert uniform_pairs(10, 30) == [(i, 3 * i + 2) for i in range(10)]
    assert uniform_pairs(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert uniform_pairs(3, 4) == [(0, 0), (1, 2), (2, 3)]   # (i+1) 4/3 = 1.33, 2.67, 4 round to 1, 3, 4
    pairs, how = layer_map("auto", student_path=wide["skip"], n_student=2, n_teacher=4, embed=True, final=True)
    assert (pairs, how) == ([("embed", "embed"), (0, 0), (1, 3), ("final", "final")], "prune")
    assert layer_map("auto", student_path=wide["teacher"], n_student=4, n_teacher=4)[1] == "uniform"
    with pytest.raises(ConfigError, match="teacher has 6: the prune map pairs it"):
        layer_map("prune", student_path=wide["skip"], n_student=2, n_teacher=6)
    with pytest.raises(ConfigError, match="prune reads the student's prune.json.*has none"):
        layer_map("prune", student_path=wide["teacher"], n_student=4, n_teacher=4)
    with pytest.raises(ConfigError, match=r"pair \[0, 4\]: the teacher has blocks 0..3"):
        layer_map([[0, 4]], student_path="", n_student=2, n_teacher=4)
    with pytest.raises(ConfigError, match="each layer pair is"):
        check_objective([{"term": "hidden_cosine", "layers": [[0, -1]]}])
    capsys.readouterr()
    objective([{"term": "hidden_cosine"}], load_model(wide["skip"]), load_model(wide["teacher"]), wide["skip"])
    assert "hidden_cosine: layer map prune (from " in capsys.readouterr().out


def test_prune_map_on_a_hand_pruned_model(wide, batch, tmp_path):
    """The prune map pairs each block with the one it was cut from: the prefix-pruned copy (its blocks see the
    teacher's own inputs) scores ~0 at every kept block; cut [0, 3] scores ~0 at block 0 only. prune() itself
    writes the prune.json the map reads."""
    t = load_model(wide["teacher"]).eval()
    for kind in ("cosine", "mse"):
        prefix = load_model(wide["prefix"]).eval()
        obj = objective([{"term": f"hidden_{kind}", "final": False}], prefix, t, wide["prefix"])
        assert obj.terms[0].pairs == [(0, 0), (1, 1)]
        assert float(obj(inputs(prefix, t, batch))[f"hidden_{kind}"][0]) < 1e-6
        skip = load_model(wide["skip"]).eval()
        for pairs, small in (([[0, 0]], True), ([[1, 3]], False)):
            value = float(objective([{"term": f"hidden_{kind}", "layers": pairs}], skip, t)(
                inputs(skip, t, batch))[f"hidden_{kind}"][0])
            assert (value < 1e-6) == small, (pairs, value)
    info = prune(wide["teacher"], tmp_path / "cut", layers=2, method="uniform", n_samples=4, max_length=32,
                 progress=False)
    cut = load_model(str(tmp_path / "cut"))
    assert objective([{"term": "hidden_cosine"}], cut, t, str(tmp_path / "cut")).terms[0].pairs == \
        list(enumerate(info["kept_layers"])) == [(0, 0), (1, 3)]


@pytest.mark.parametrize("teacher", ["cache:/nowhere", "openai:teacher@http://127.0.0.1:9/v1", "xtok:/nowhere"],
                         ids=["cache", "served", "other-tokenizer"])
def test_teachers_without_hidden_states_are_refused_at_config_time(teacher):
    """Before any model loads, naming the term and the teacher's kind."""
    with pytest.raises(ConfigError, match=r"term hidden_cosine needs its hidden states; a \w+ teacher gives"):
        load_config("minitron", ["student=S", f"teacher={teacher}"])


def overrides(student, teacher, out, **extra):
    o = {"student": student, "teacher": teacher, "output_dir": str(out), "max_train_examples": 8, "batch_size": 4,
         "micro_batch_size": 2, "valid_data": "", "save_steps": 1000, "eval_steps": 1000, "progress": False,
         "max_length": 96, "max_prompt_length": 80, "device": "cpu", "lr": 5e-3, "warmup_steps": 0,
         "template": "alpaca", **extra}
    return [f"{k}={v}" for k, v in o.items()]


def metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_train_minitron_on_a_pruned_student(wide, tmp_path, capsys):
    """`train minitron student=PRUNED teacher=ORIG`: the prune map, no projection (same width), the hidden term
    balanced to fkl (logged as fkl's value, its own value beside it), both falling on a fixed batch."""
    cfg = load_config("minitron", overrides(wide["skip"], wide["teacher"], tmp_path, max_steps=6, max_train_examples=4,
                                            lr=2e-3))
    assert [e["term"] for e in cfg.objective] == ["fkl", "hidden_cosine"]   # no cross-entropy term
    train(cfg)
    said = capsys.readouterr().out
    assert "hidden_cosine: layer map prune (from " in said and "0->0, 1->3, final->final" in said
    rows = metrics(tmp_path)
    assert all(r["loss/hidden_cosine"] == pytest.approx(r["loss/fkl"]) for r in rows)
    assert rows[-1]["loss/hidden_cosine_unbalanced"] < rows[0]["loss/hidden_cosine_unbalanced"]
    assert rows[-1]["loss/fkl"] < rows[0]["loss/fkl"]
    assert not (tmp_path / "hidden_projection.safetensors").exists()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_train_minitron_across_widths_trains_and_saves_the_projection(lora, model_dirs, wide, tmp_path):
    """A width-24 student and a width-128 teacher: the shared projection trains with the student, sits in every
    checkpoint and in OUTPUT_DIR/hidden_projection.safetensors, never in final/ (LoRA: merged, no adapter keys)."""
    extra = {"lora": "true", "lora_r": 4, "lr": 2e-2} if lora else {}
    cfg = load_config("minitron", overrides(model_dirs["student"], wide["teacher"], tmp_path, max_steps=3,
                                            save_steps=3, **extra))
    result = train(cfg)
    path = tmp_path / "hidden_projection.safetensors"
    saved = load_file(str(path))
    assert set(saved) == {"hidden_cosine.0.weight", "hidden_cosine.0.bias"}
    assert saved["hidden_cosine.0.weight"].shape == (128, 24)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["hidden_cosine.pairs"]) == [[0, 1], [1, 3], ["final", "final"]]
    assert meta["hidden_cosine.map"] == "uniform"
    assert saved["hidden_cosine.0.bias"].abs().sum() > 0   # trained (it starts at 0)
    ckpt = torch.load(tmp_path / "checkpoints" / "step-0000003" / "objective.pt", weights_only=True)
    for k, v in saved.items():
        torch.testing.assert_close(ckpt["terms.1.projection." + k.split(".", 1)[1]], v, rtol=0, atol=0)
    final = load_file(str(Path(result["final"]) / "model.safetensors"))
    assert not any("projection" in k or "lora" in k for k in final)
    assert not any(p.name.startswith("hidden_projection") for p in Path(result["final"]).iterdir())
    start = load_file(str(Path(model_dirs["student"]) / "model.safetensors"))
    assert any(not torch.equal(start[k], final[k]) for k in start)


@pytest.mark.parametrize("where", ["trained", "all"])
def test_gradient_accumulation_equals_one_big_batch(where, model_dirs, tmp_path):
    """micro_batch_size 1 and 4 give the same gradients of the student and of the projection (each micro-batch
    weighted by its share of the token set: sequences for trained positions, every non-padding position for all),
    and the same weights after 3 steps."""
    from lmdistill.train.run import Run

    grads, finals = {}, {}
    for micro in (4, 1):
        out = tmp_path / f"m{micro}"
        cfg = load_config("minitron", overrides(model_dirs["student"], model_dirs["teacher"], out, max_steps=3,
                                                micro_batch_size=micro, **{
                                                    "objective.hidden_cosine.balance_with": "null",
                                                    "objective.hidden_cosine.projection": "always",
                                                    "objective.hidden_cosine.positions": where}))
        assert cfg.objective[1]["positions"] == where and "balance_with" not in cfg.objective[1]
        run = Run(cfg)
        prepared = run.build_sequences(0)
        run.forward_backward(prepared, run.token_totals(prepared))
        grads[micro] = [p.grad.clone() for p in run.params()]
        assert len(prepared) == 4 // micro and run.objective.terms[1].tokens == (
            "sequences" if where == "trained" else "positions")
        train(cfg)
        finals[micro] = {**load_file(str(out / "final" / "model.safetensors")),
                         **load_file(str(out / "hidden_projection.safetensors"))}
    for a, b in zip(grads[4], grads[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-8)
    for k, v in finals[4].items():
        torch.testing.assert_close(finals[1][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_fsdp2_two_processes_match_one(model_dirs, tmp_path):
    """minitron with its balancer and a projection, 4 steps: FSDP2 on two CPU processes (gloo) gives the
    one-process weights and projection (micro-batches of one row on both, so the balancer sees the same rows)."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        env.pop(k, None)
    common = ["max_steps=4", "micro_batch_size=1", "objective.hidden_cosine.projection=always"]
    runs = {}
    for name, launcher in (("one", [sys.executable, "-m", "lmdistill"]),
                           ("two", [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                    str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2",
                                    "-m", "lmdistill"])):
        out = tmp_path / name
        args = overrides(model_dirs["student"], model_dirs["teacher"], out)
        p = subprocess.run([*launcher, "train", "minitron", *args, *common], env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        runs[name] = {**load_file(str(out / "final" / "model.safetensors")),
                      **load_file(str(out / "hidden_projection.safetensors"))}
        assert (p.stdout + p.stderr).count("hidden_cosine: layer map") == 1   # said once, by rank 0
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    for k, v in runs["one"].items():
        torch.testing.assert_close(runs["two"][k], v, rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert not math.isnan(metrics(tmp_path / "two")[-1]["loss"])


def test_pair_loss_of_no_rows_is_a_graph_zero():
    x = torch.zeros(0, 4, requires_grad=True)
    value = pair_loss("cosine", x, torch.zeros(0, 4))
    value.backward()
    assert float(value.detach()) == 0 and x.grad is not None
