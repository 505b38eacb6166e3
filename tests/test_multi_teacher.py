"""Several teachers per run (``teachers:``): each row read by the teacher it names (teachers/routed.py), a weighted
mixture (teachers/mixture.py), the settings and data rows (train/teacher_set.py), micro-batches of one teacher and
per-teacher metrics (train/route_plan.py), FSDP2 with several sharded teachers."""

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmdistill.cli import main
from lmdistill.data import collate_for_training, load_examples, tokenize_examples
from lmdistill.errors import ConfigError, DataError
from lmdistill.losses.model_forward import forward_logits, selected_logits, shifted
from lmdistill.losses.sparse import sparse_per_token
from lmdistill.models import build_model, load_model
from lmdistill.teachers import (Capabilities, LocalTeacher, MixedTeacher, Need, RoutedTeacher, ServedTeacher, Teacher,
                                TeacherCache)
from lmdistill.train import load_config, train
from lmdistill.train.data_order import global_batch_indices
from lmdistill.train.route_plan import micro_batches

ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dirs(model_dirs, tokenizer, tmp_path_factory):
    """The micro student and teacher (seeds 2 and 1), and a second micro teacher (seed 4)."""
    second = tmp_path_factory.mktemp("second") / "t2"
    build_model("micro", second, tokenizer=tokenizer, seed=4)
    return {**model_dirs, "second": str(second)}


@functools.lru_cache(maxsize=1)
def short_examples():
    """Dolly training examples whose prompts fit the runs' ``max_prompt_length`` (80): none is filtered out."""
    from lmdistill.models import build_tokenizer

    examples = load_examples("dolly:train").examples[:80]
    rows, _ = tokenize_examples(examples, build_tokenizer(), max_prompt_length=80, max_length=96)
    kept = {r.id for r in rows}
    return [ex for ex in examples if ex.id in kept]


def write_rows(path, routes, start=0):
    """Short Dolly training rows, row ``i`` naming teacher ``routes[i]`` (``None``: no ``teacher`` field)."""
    examples = short_examples()[start:start + len(routes)]
    assert len(examples) == len(routes)
    with open(path, "w") as f:
        for ex, route in zip(examples, routes):
            row = {"id": ex.id, "instruction": ex.instruction, "input": ex.input, "output": ex.output}
            f.write(json.dumps(row if route is None else {**row, "teacher": route}) + "\n")
    return str(path)


def overrides(dirs, out, **extra):
    o = {"student": dirs["student"], "output_dir": str(out), "batch_size": 4, "micro_batch_size": 2,
         "valid_data": "", "save_steps": 1000, "eval_steps": 1000, "progress": False, "max_length": 96,
         "max_prompt_length": 80, "device": "cpu", "template": "alpaca", "lr": 5e-3, "sampling.max_new_tokens": 8,
         **extra}
    return [f"{k}={v}" for k, v in o.items()]


def two(dirs):
    return f"{{a: {dirs['teacher']}, b: {dirs['second']}}}"


def metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "model.safetensors"))


def rows_and_batch(tokenizer, path):
    rows, _ = tokenize_examples(load_examples(path).examples, tokenizer, max_prompt_length=80, max_length=96)
    return rows, collate_for_training(rows, tokenizer.pad_token_id)


def kl_per_row(t_logits, s_logits, mask):
    """Brute force in float64: sum over each row's trained positions of sum_v p log(p / q)."""
    p, q = torch.softmax(t_logits.double(), -1), torch.softmax(s_logits.double(), -1)
    return ((p * (p.log() - q.log())).sum(-1) * mask).sum(-1)


# ---------------------------------------------------------------------------------------------- the routed teacher
def test_rows_routed_to_two_teachers_get_each_teachers_own_distributions(dirs, tokenizer, tmp_path):
    alone = {n: LocalTeacher(load_model(dirs[k], dtype=torch.float64)) for n, k in (("a", "teacher"), ("b", "second"))}
    rows, batch = rows_and_batch(tokenizer, write_rows(tmp_path / "d.jsonl", ["a", "b", "b", "a", "b", "a"]))
    routes = [r.example.teacher for r in rows]
    assert set(routes) == {"a", "b"}
    view = RoutedTeacher(alone).given(rows)
    mask = batch["loss_mask"][:, 1:]
    student = forward_logits(load_model(dirs["student"], dtype=torch.float64), batch)[:, :-1]
    whole = {n: t.logits(batch, mask, True) for n, t in alone.items()}   # each teacher alone on every row
    got = kl_per_row(view.logits(batch, mask, True), student, mask)
    want = torch.stack([kl_per_row(whole[r][i:i + 1], student[i:i + 1], mask[i:i + 1])[0]
                        for i, r in enumerate(routes)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert not torch.allclose(want, kl_per_row(whole["a"], student, mask))   # the teachers differ
    flat, counts = view.logits(batch, mask, False), mask.sum(1).tolist()   # at trained positions, row-major
    for i, part in enumerate(torch.split(flat, counts)):
        torch.testing.assert_close(part, whole[routes[i]][i][mask[i].bool()], rtol=0, atol=1e-12)
    lp = view.token_logprobs(rows, batch)
    for i, part in enumerate(torch.split(lp, counts)):
        torch.testing.assert_close(part, alone[routes[i]].token_logprobs(rows[i:i + 1], {k: v[i:i + 1] for k, v in
                                                                                       batch.items()}), atol=1e-6,
                                   rtol=0)
    assert RoutedTeacher(alone).given([r for r in rows if r.example.teacher == "b"]) is alone["b"]


def test_routes_capabilities_and_refusals(dirs, tokenizer, tmp_path):
    class Sparse(Teacher):   # a cache-like member: top-k of the rows it holds, nothing else
        kind = "sparse"
        capabilities = Capabilities(top_k=True, new_sequences=False, temperatures=(1.0,))

        def aligned(self, rows, batch):
            return "aligned by b"

    local = LocalTeacher(load_model(dirs["teacher"]))
    routed = RoutedTeacher({"a": local, "b": Sparse()})
    caps = routed.capabilities
    assert not (caps.logits or caps.top_k or caps.steps or caps.new_sequences) and caps.temperatures == (1.0,)
    routed.check([Need("term fkl", ("logits", "top_k"), 1.0)])   # each member meets it in its own way
    with pytest.raises(ConfigError, match=r"teachers\.b: term hidden_cosine needs its hidden states; a sparse"):
        routed.check([Need("term hidden_cosine", ("hidden_states",))])
    with pytest.raises(ConfigError, match="policy switch asks the teacher while it generates"):
        routed.check([Need("policy switch", ("steps",))])
    rows, batch = rows_and_batch(tokenizer, write_rows(tmp_path / "d.jsonl", ["a", "b", None, "c"]))
    ids = [ex.id for ex in short_examples()]
    with pytest.raises(ConfigError, match=rf"row '{ids[2]}' \({tmp_path}/d.jsonl:3\) names no teacher"):
        routed.route(rows)
    with pytest.raises(ConfigError, match=rf"row '{ids[3]}' \(.*d.jsonl:4\) names teacher 'c', which is not"):
        routed.route(rows[3:])
    assert RoutedTeacher({"only": local}).route(rows[2:3]) == ["only"]   # one teacher reads every row
    assert routed.aligned(rows[1:2], batch) == "aligned by b"   # a method it does not split goes to the member
    with pytest.raises(ConfigError, match="aligned cannot be split between teachers"):
        routed.aligned(rows[:2], batch)
    with pytest.raises(ConfigError, match="ask teacher.given"):
        routed.logits(batch, batch["loss_mask"][:, 1:], True)
    other = LocalTeacher(load_model(dirs["second"]))
    mixed = RoutedTeacher({"a": local, "b": other}).given(rows[:2])
    with pytest.raises(ConfigError, match="the LM head differs between the teachers"):
        mixed.hidden({k: v[:2] for k, v in batch.items()})
    assert mixed.layer_shape() == local.layer_shape()


def test_the_mixture_is_the_weighted_average_of_the_teachers_probabilities(dirs, tokenizer, tmp_path):
    a, b = (LocalTeacher(load_model(dirs[k], dtype=torch.float64)) for k in ("teacher", "second"))
    _, batch = rows_and_batch(tokenizer, write_rows(tmp_path / "d.jsonl", [None] * 4))
    mask = batch["loss_mask"][:, 1:]
    mix = MixedTeacher({"a": a, "b": b}, {"a": 7, "b": 3})   # weights normalised: 0.7 and 0.3
    for whole in (True, False):
        want = 0.7 * torch.softmax(a.logits(batch, mask, whole), -1) + 0.3 * torch.softmax(b.logits(batch, mask,
                                                                                                     whole), -1)
        got = torch.softmax(mix.logits(batch, mask, whole), -1)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    sparse = RoutedTeacher({"x": a})
    sparse.capabilities = Capabilities(top_k=True)
    with pytest.raises(ConfigError, match=r"teacher_mix: teachers\.b \(a routed teacher\) does not give its full"):
        MixedTeacher({"a": a, "b": sparse}, {"a": 1, "b": 1})


# ---------------------------------------------------------------------------------------------- settings and rows
@pytest.mark.parametrize("extra,message", [
    ({"teacher": "T"}, "teacher: and teachers: are both set"),
    ({"policy": "switch"}, "policy switch: asks the teacher while generating"),
    ({"teacher_route": "random"}, "teacher_route: must be field"),
    ({"teacher_route": "source"}, r"teacher_route: source needs data: \{NAME: PATH\}"),
    ({"teacher_route": "source", "data": "{a: x.jsonl, c: y.jsonl}"},
     "data source 'c' has no teacher of that name; teachers.b has no data source"),
    ({"teacher_mix": "{a: 1}"}, "teacher_mix: must give a weight to each of the teachers"),
    ({"teacher_mix": "{a: 1, b: -2}"}, r"teacher_mix\.b: must be a finite number > 0"),
    ({"teachers": "{a: T, b: cache:/no/such}", "teacher_mix": "{a: 1, b: 1}"},
     r"teacher_mix: teachers\.b \(cache:/no/such\) does not give its full"),
    ({"teachers": "{a: T, b: cache:/no/such}", "objective": "[{term: dac_kl, weight: 1}]"},
     r"teachers\.b: cache:/no/such: term dac_kl needs"),
    ({"teachers": "{'a b': T}"}, "teachers: 'a b' is not a name"),
    ({"teacher_mix": "{a: 1, b: 1}", "chunked_loss": "true"}, "chunked_loss: reads one teacher's hidden states"),
    ({"teacher_mix": "{a: 1, b: 1}", "objective": "[{term: hidden_cosine, weight: 1}]"},
     "teacher_mix: term hidden_cosine needs its hidden states; a mixture teacher gives its full next-token"),
])
def test_settings_that_cannot_run_are_refused_by_key(extra, message, dirs, tmp_path):
    values = {"teachers": "{a: T, b: U}", **extra}
    with pytest.raises(ConfigError, match=message):
        load_config("kd", overrides(dirs, tmp_path, **values))


def test_a_missing_or_unknown_teacher_names_each_row_before_any_model_loads(dirs, tmp_path, monkeypatch, capsys):
    data = write_rows(tmp_path / "d.jsonl", ["a", "b", None, "a", "c", "b"])
    ids = [ex.id for ex in short_examples()]
    cfg = load_config("kd", overrides(dirs, tmp_path / "o", data=data, teachers=two(dirs), max_steps=1))
    monkeypatch.setattr("lmdistill.train.run.load_student", lambda *a: pytest.fail("a model loaded"))
    with pytest.raises(DataError) as e:
        train(cfg)
    assert str(e.value).splitlines() == [
        f"{data}:3: field \"teacher\" is missing (row id '{ids[2]}'); with several teachers (a, b) each row "
        "names the one that reads it",
        f"{data}:5: field \"teacher\" names 'c' (row id '{ids[4]}'), which is not one of the run's teachers "
        "(a, b)"]
    assert main(["train", "kd", *overrides(dirs, tmp_path / "o2", data=data, teachers=two(dirs))]) == 2
    assert f"{data}:5" in capsys.readouterr().err


def test_a_member_with_another_tokenizer_is_refused_by_name(dirs, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(dirs["second"], other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == n) for n in (300, 301))
    vocab[a], vocab[b] = 301, 300   # same tokens, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tj))
    for mix in ({}, {"teacher_mix": "{a: 1, b: 1}"}):
        cfg = load_config("kd", overrides(dirs, tmp_path / "o", teachers=f"{{a: {dirs['teacher']}, b: {other}}}",
                                          data=write_rows(tmp_path / "d.jsonl", ["a", "b"]), **mix))
        with pytest.raises(ConfigError, match=r"teachers\.b: teacher and student tokenizers differ at id 300"):
            train(cfg)


def test_source_routing_reads_each_source_with_its_namesake(dirs, tokenizer, tmp_path):
    a, b = write_rows(tmp_path / "a.jsonl", [None] * 3), write_rows(tmp_path / "b.jsonl", [None] * 5, start=3)
    out = tmp_path / "o"
    result = train(load_config("kd", overrides(dirs, out, data=f"{{a: {a}, b: {b}}}", teacher_route="source",
                                               teachers=two(dirs), max_steps=2, batch_size=8, micro_batch_size=4)))
    assert result["steps"] == 2
    counts = {n: float(shifted(rows_and_batch(tokenizer, p)[1])[1].sum()) for n, p in (("a", a), ("b", b))}
    for row in metrics(out):   # every step reads all 8 rows: each teacher the tokens of its own source
        assert (row["tokens@a"], row["tokens@b"]) == (counts["a"], counts["b"])
    bad = write_rows(tmp_path / "bad.jsonl", [None, "b"])
    with pytest.raises(DataError, match=rf"{bad}:2: field \"teacher\" names 'b', but its source 'a' is read"):
        train(load_config("kd", overrides(dirs, tmp_path / "o2", data=f"{{a: {bad}, b: {b}}}",
                                          teacher_route="source", teachers=two(dirs), max_steps=1)))


# ---------------------------------------------------------------------------------------------- training
def step_one_shares(dirs, tokenizer, data, cfg, readers):
    """Each teacher's share of the first step's forward KL and its tokens, float64, with the initial student;
    ``readers``: name -> a model folder (``dirs`` key, brute force over the vocabulary) or a teacher giving top-k
    scores (the same bins as the run's sparse loss)."""
    rows, _ = rows_and_batch(tokenizer, data)
    step = [rows[i] for i in global_batch_indices(0, cfg.batch_size, len(rows), cfg.seed)]
    total = shifted(collate_for_training(step, tokenizer.pad_token_id))[1].sum()
    student = load_model(dirs["student"], dtype=torch.float64)
    out = {}
    for name, reader in readers.items():
        mine = [r for r in step if r.example.teacher == name]
        batch = collate_for_training(mine, tokenizer.pad_token_id)
        _, mask = shifted(batch)
        s = selected_logits(student, batch, mask)
        if isinstance(reader, str):
            p = torch.softmax(selected_logits(load_model(dirs[reader], dtype=torch.float64), batch, mask), -1)
            kl = (p * (p.log() - torch.log_softmax(s, -1))).sum()
        else:
            kl = sparse_per_token("fkl", s, reader.top_k(mine, batch)).sum()
        out[name] = (float(kl / total), float(mask.sum()))
    return out


def test_per_teacher_losses_and_tokens_are_exact_shares(dirs, tokenizer, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", ["a", "b", "b", "a", "a", "b", "a", "b"])
    out = tmp_path / "o"
    cfg = load_config("kd", overrides(dirs, out, data=data, teachers=two(dirs), max_steps=3))
    train(cfg)
    logged = metrics(out)
    assert [r["step"] for r in logged] == [1, 2, 3]
    for r in logged:   # the teachers' shares add up to each term and to the step's tokens
        for term in ("sft", "fkl"):
            assert r[f"loss/{term}@a"] + r[f"loss/{term}@b"] == pytest.approx(r[f"loss/{term}"], rel=1e-6, abs=1e-9)
        assert r["tokens@a"] + r["tokens@b"] == r["tokens"]
    for name, (kl, tokens) in step_one_shares(dirs, tokenizer, data, cfg, {"a": "teacher", "b": "second"}).items():
        assert logged[0][f"loss/fkl@{name}"] == pytest.approx(kl, rel=1e-5)
        assert logged[0][f"tokens@{name}"] == tokens > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert {"loss/fkl@a", "loss/fkl@b", "loss/sft@a", "tokens@a", "tokens@b"} <= set(events.Tags()["scalars"])


@pytest.mark.parametrize("policy,chunked", [("gold", False), ("student", False), ("gold", True)])
def test_all_rows_to_one_teacher_is_the_single_teacher_run_bit_for_bit(policy, chunked, dirs, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", ["a"] * 8)
    runs = {"one": {"teacher": dirs["teacher"]}, "two": {"teachers": two(dirs)}}
    if policy == "gold" and not chunked:   # one member by name, rows that name none
        runs["named"] = {"teachers": f"{{default: {dirs['teacher']}}}", "data": write_rows(tmp_path / "n.jsonl",
                                                                                            [None] * 8)}
    for name, extra in runs.items():
        train(load_config("kd", overrides(dirs, tmp_path / name, **{"data": data, "max_steps": 3, "policy": policy,
                                                                   "chunked_loss": chunked, **extra})))
    want = weights(tmp_path / "one")
    for name in runs:
        got = weights(tmp_path / name)
        assert all(torch.equal(want[k], got[k]) for k in want), name
        assert [r["loss"] for r in metrics(tmp_path / name)] == [r["loss"] for r in metrics(tmp_path / "one")]
    assert all(r["tokens@b"] == 0 and r["loss/fkl@b"] == 0 for r in metrics(tmp_path / "two"))


def test_a_cache_member_and_a_served_member_each_score_their_rows(dirs, tokenizer, teacher_server, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", ["c", "s", "s", "c", "c", "s", "c", "s"])
    cache = tmp_path / "cache"
    assert main(["capture", "--teacher", dirs["second"], "--data", data, "--out", str(cache), "--top-k", "1000000",
                 "--max-length", "96", "--max-prompt-length", "80", "--template", "alpaca", "--logprob-dtype",
                 "float32", "--no-progress"]) == 0
    out, served = tmp_path / "o", f"openai:teacher@{teacher_server.base_url}"
    cfg = load_config("kd", overrides(dirs, out, data=data, teachers=f"{{c: 'cache:{cache}', s: '{served}'}}",
                                      teacher_top_k=16, max_steps=2))
    train(cfg)
    logged = metrics(out)
    alone = {"c": TeacherCache(cache), "s": ServedTeacher.from_spec(served, top_k=16, api="echo")}
    for name, (kl, tokens) in step_one_shares(dirs, tokenizer, data, cfg, alone).items():
        assert logged[0][f"loss/fkl@{name}"] == pytest.approx(kl, rel=1e-3)   # float32 sums of 1e-6 terms
        assert logged[0][f"tokens@{name}"] == tokens > 0
    scores = out / "teachers" / "s" / "teacher_scores.jsonl"   # the server's answers, kept for a resumed run
    assert len(scores.read_text().splitlines()) == 4


def test_every_process_runs_the_same_teachers_micro_batches(tokenizer, tmp_path):
    rows, _ = rows_and_batch(tokenizer, write_rows(tmp_path / "d.jsonl", ["a", "a", "b", "a", "a", "a", "b", "a"]))
    routed = RoutedTeacher({"a": Teacher(), "b": Teacher()})
    plans = [micro_batches(routed, rows, rank, 2, 2) for rank in range(2)]
    # process 0 holds rows 0 2 4 6 (a b a b), process 1 rows 1 3 5 7 (a a a a): each adds a stand-in
    assert [(s.route, s.weight) for s in plans[0]] == [("a", 1.0), ("a", 0.0), ("b", 1.0)]
    assert [(s.route, s.weight) for s in plans[1]] == [("a", 1.0), ("a", 1.0), ("b", 0.0)]
    for rank, plan in enumerate(plans):
        real = [r for s in plan if s.weight for r in s.rows]
        assert sorted(r.id for r in real) == sorted(r.id for r in rows[rank::2])
        assert all(r.example.teacher == s.route and len(s.rows) <= 2 for s in plan for r in s.rows)
    assert [s.rows for s in micro_batches(Teacher(), rows, 0, 1, 3)] == [rows[:3], rows[3:6], rows[6:]]
    assert [s.rows for s in micro_batches(None, rows, 1, 2, 3)] == [rows[1::2][:3], rows[1::2][3:]]


@pytest.mark.slow
def test_fsdp2_with_two_sharded_teachers_matches_one_process(dirs, tokenizer, tmp_path):
    import os

    env = {**os.environ, **ENV}
    for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        env.pop(k, None)
    data = write_rows(tmp_path / "d.jsonl", ["a", "a", "b", "a", "a", "a", "b", "a"])
    rows, _ = rows_and_batch(tokenizer, data)
    routed = RoutedTeacher({"a": Teacher(), "b": Teacher()})
    stand_ins = sum(not s.weight for step in range(6) for rank in range(2)
                    for s in micro_batches(routed, [rows[i] for i in global_batch_indices(step, 4, 8, 42)], rank, 2, 1))
    assert stand_ins > 0   # some step gives one process fewer rows of a teacher than the other
    common = dict(data=data, teachers=two(dirs), max_steps=6)
    one, two_ = tmp_path / "one", tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2"]
    for cmd in ([sys.executable, "-m", "lmdistill", "train", "kd", *overrides(dirs, one, **common)],
                [*launch, "-m", "lmdistill", "train", "kd", *overrides(dirs, two_, micro_batch_size=1, **common)]):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    a, b = weights(one), weights(two_)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    for x, y in zip(metrics(one), metrics(two_)):
        assert x["tokens@a"] == y["tokens@a"] and x["tokens@b"] == y["tokens@b"]
        assert x["loss/fkl@b"] == pytest.approx(y["loss/fkl@b"], rel=1e-4)
    memory = json.loads((two_ / "fsdp.json").read_text())   # each teacher sharded: each process holds half
    for name in ("teacher.0", "teacher.1"):
        assert all(0.4 < local / memory[name]["full_bytes"] < 0.6 for local in memory[name]["local_bytes"])
    assert math.isfinite(metrics(two_)[-1]["loss"])
