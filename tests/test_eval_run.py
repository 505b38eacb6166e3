"""End-to-end ``lmdistill eval`` on micro models: every output file, reuse, determinism, errors."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from lmdistill.cli import main
from lmdistill.data import EVAL_BENCHMARKS, format_prompt, load_examples
from lmdistill.evaluate import predictors as predictors_mod
from lmdistill.errors import ConfigError
from lmdistill.evaluate.run import EvalSettings, evaluate_models
from lmdistill.models import load_model, load_tokenizer

DIRECT = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
LIMIT, SEEDS = 4, (10, 20)
QUICK = ["--limit", str(LIMIT), "--seeds", "10,20", "--max-new-tokens", "8", "--batch-size", "3", "--no-progress"]


def direct(pred: str, refs: list[str]) -> float:
    return 100 * max(DIRECT.score(r, pred)["rougeL"].fmeasure for r in refs)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_dirs):
    """One CLI evaluation of two micro models on a 4-example slice of every benchmark."""
    out = tmp_path_factory.mktemp("eval")
    args = ["eval", f"student={model_dirs['student']}", model_dirs["teacher"], "--out", str(out), *QUICK]
    assert main(args) == 0
    return out, args


def test_writes_every_output_file(run, capsys):
    out, _ = run
    res = json.loads((out / "results.json").read_text())
    names = ["student", "teacher"]
    assert list(res["models"]) == names and res["benchmarks"] == list(EVAL_BENCHMARKS)
    s = res["settings"]
    assert (s["temperature"], s["top_p"], s["top_k"], s["max_new_tokens"], s["max_prompt_length"]) == (1.0, 1.0, 0, 8, 256)
    assert s["seeds"] == list(SEEDS) and s["limit"] == LIMIT and s["protocol"].startswith("differs")
    for name in names:
        model = res["models"][name]
        assert model["kind"] == "local" and model["prompt"] == "alpaca"
        for bench in EVAL_BENCHMARKS:
            refs = {e.id: e.references for e in load_examples(bench).examples[:LIMIT]}
            entry = model["benchmarks"][bench]
            assert entry["n"] + entry["dropped"] == entry["total"] == LIMIT
            scores = []
            for seed in SEEDS:
                rows = read_rows(out / "predictions" / name / bench / f"seed{seed}.jsonl")
                assert [r["id"] for r in rows] == [i for i in refs if i not in entry["dropped_ids"]]
                for r in rows:
                    assert r["output"] == r["output"].strip() and 1 <= r["tokens"] <= 8
                    assert r["rougeL"] == pytest.approx(direct(r["output"], refs[r["id"]]))
                seed_score = statistics.fmean(r["rougeL"] for r in rows)
                assert entry["seeds"][str(seed)] == pytest.approx(seed_score)
                scores.append(seed_score)
            assert entry["mean"] == pytest.approx(statistics.fmean(scores))
            assert entry["std"] == pytest.approx(statistics.stdev(scores))
        avg = model["average"]
        averaged = [b for b in EVAL_BENCHMARKS if b != "unni"]   # UnNI's 1-2-word bucket is shown, not averaged
        assert avg["over"] == averaged == res["average_over"]
        for seed in SEEDS:
            per_bench = [model["benchmarks"][b]["seeds"][str(seed)] for b in averaged]
            assert avg["seeds"][str(seed)] == pytest.approx(statistics.fmean(per_bench))

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * (len(EVAL_BENCHMARKS) + 1)
    first = rows[0]
    assert (first["model"], first["benchmark"]) == ("student", "dolly")
    assert float(first["mean"]) == pytest.approx(res["models"]["student"]["benchmarks"]["dolly"]["mean"], abs=1e-4)
    assert set(first) >= {"seed10", "seed20", "n", "dropped", "std"}

    md = (out / "results.md").read_text()
    assert "| Model | Dolly | SelfInst | Vicuna | S-NI | UnNI (1-2 words) | Avg. |" in md
    assert "Avg. = mean over Dolly, SelfInst, Vicuna, S-NI (not UnNI (1-2 words)" in md
    dolly = res["models"]["teacher"]["benchmarks"]["dolly"]
    assert f"| teacher | {dolly['mean']:.2f} ± {dolly['std']:.2f} |" in md

    png = out / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[0] > 100


def test_average_all_includes_unni():
    from lmdistill.evaluate.run import average_entry, averaged_benchmarks

    assert averaged_benchmarks(["dolly", "unni"]) == ["dolly"]
    assert averaged_benchmarks(["dolly", "unni"], average_all=True) == ["dolly", "unni"]
    assert averaged_benchmarks(["unni"]) == ["unni"]            # nothing else to average
    entries = {"dolly": {"seeds": {"1": 10.0}}, "unni": {"seeds": {"1": 40.0}}}
    assert average_entry(entries, [1], ["dolly"])["mean"] == 10.0
    assert average_entry(entries, [1])["mean"] == 25.0


def test_long_prompts_are_truncated_to_their_first_tokens_and_counted(run, tokenizer):
    """The protocol keeps a long prompt's first 256 tokens (MiniLLM ``PromptDataset.__getitem__``:
    ``prompt = data[:prompt_length]``, LMOps ``minillm/data_utils/prompt_datasets.py:104-106``); nothing is dropped,
    and results.json lists the truncated ids."""
    out, _ = run
    res = json.loads((out / "results.json").read_text())
    assert (res["settings"]["prompt_overflow"], res["settings"]["no_repeat_ngram_size"]) == ("truncate", 6)
    total = 0
    for bench in EVAL_BENCHMARKS:
        exs = load_examples(bench).examples[:LIMIT]
        too_long = [e.id for e in exs
                    if len(tokenizer(format_prompt(e, "alpaca"), add_special_tokens=False)["input_ids"]) > 256]
        entry = res["models"]["student"]["benchmarks"][bench]
        assert entry["truncated_ids"] == too_long and entry["truncated"] == len(too_long)
        assert entry["dropped"] == 0 and entry["dropped_ids"] == [] and entry["n"] == LIMIT
        total += len(too_long)
    assert total >= 2  # the slice really exercises the rule (S-NI and Self-Instruct prompts)
    md = (out / "results.md").read_text()
    assert "S-NI 4 (0 dropped, 2 truncated)" in md
    assert "no_repeat_ngram_size 6" in md and "truncated to their first 256 tokens (prompt_overflow: truncate)" in md
    rows = list(csv.DictReader((out / "results.csv").open()))
    sni = next(r for r in rows if (r["model"], r["benchmark"]) == ("student", "sni"))
    assert (sni["dropped"], sni["truncated"]) == ("0", "2")


def test_truncation_keeps_the_first_tokens_and_drop_removes(model_dirs, tokenizer):
    exs = load_examples("sni").examples[:4]
    full = [tokenizer(format_prompt(e, "alpaca"), add_special_tokens=False)["input_ids"] for e in exs]
    pred = predictors_mod.LocalPredictor(predictors_mod.ModelSpec("s", model_dirs["student"]), device="cpu")
    items, report = pred.prepare(exs, 256)  # the default is the protocol's truncate
    assert [it.prompt_ids for it in items] == [ids[:256] for ids in full]
    assert report.truncated_ids == [e.id for e, ids in zip(exs, full) if len(ids) > 256] and report.removed == 0
    kept, dropped = pred.prepare(exs, 256, "drop")
    assert [it.prompt_ids for it in kept] == [ids for ids in full if len(ids) <= 256]
    assert dropped.removed_ids == report.truncated_ids and dropped.truncated == 0
    with pytest.raises(ConfigError, match="prompt_overflow must be one of truncate, drop"):
        pred.prepare(exs, 256, "cut")


def test_eval_settings_default_to_the_protocol_ban():
    s = EvalSettings()
    assert (s.no_repeat_ngram_size, s.prompt_overflow) == (6, "truncate")
    assert s.sampling().no_repeat_ngram_size == 6
    assert EvalSettings(no_repeat_ngram_size=0).sampling().no_repeat_ngram_size == 0


def test_rerun_reuses_finished_seeds(run, monkeypatch):
    out, args = run
    before = {p: p.stat().st_mtime_ns for p in (out / "predictions").rglob("seed*.jsonl")}
    results_before = json.loads((out / "results.json").read_text())

    def refuse(*a, **k):
        raise AssertionError("a finished seed was generated again")

    monkeypatch.setattr(predictors_mod.LocalPredictor, "predict", refuse)
    monkeypatch.setattr(predictors_mod.LocalPredictor, "model", property(refuse))
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "predictions").rglob("seed*.jsonl")} == before
    assert json.loads((out / "results.json").read_text())["models"] == results_before["models"]


def test_unfinished_and_new_seeds_are_generated(tmp_path, model_dirs, monkeypatch):
    calls: list[int] = []
    real = predictors_mod.LocalPredictor.predict

    def counting(self, batch, seed, sampling, num_samples=1):
        calls.append(seed)
        return real(self, batch, seed, sampling, num_samples)

    monkeypatch.setattr(predictors_mod.LocalPredictor, "predict", counting)
    kw = dict(limit=3, max_new_tokens=4, batch_size=8, progress=False)
    evaluate_models([model_dirs["student"]], ["vicuna"], [10], tmp_path, **kw)
    seed_dir = tmp_path / "predictions" / "student" / "vicuna"
    first = (seed_dir / "seed10.jsonl").read_text()
    # a crash after the predictions but before the meta file: that seed counts as unfinished
    (seed_dir / "seed10.meta.json").unlink()
    calls.clear()
    evaluate_models([model_dirs["student"]], ["vicuna"], [10, 30], tmp_path, **kw)
    assert calls == [10, 30]
    assert (seed_dir / "seed10.jsonl").read_text() == first  # regenerated identically
    calls.clear()
    evaluate_models([model_dirs["student"]], ["vicuna"], [10, 30], tmp_path, **kw)
    assert calls == []
    assert not list(seed_dir.glob(".*.tmp"))


def test_same_seed_same_predictions_independent_of_batching(run, tmp_path, model_dirs):
    out, _ = run
    # other batch size, other slice, only one seed, only one model: seed 10 must give the same texts
    evaluate_models([f"student={model_dirs['student']}"], ["sni", "dolly"], [10], tmp_path, limit=LIMIT + 2,
                    max_new_tokens=8, batch_size=2, progress=False)
    for bench in ("sni", "dolly"):
        ref = read_rows(out / "predictions/student" / bench / "seed10.jsonl")
        again = read_rows(tmp_path / "predictions/student" / bench / "seed10.jsonl")
        assert again[:len(ref)] == ref
    s10 = read_rows(out / "predictions/student/dolly/seed10.jsonl")
    s20 = read_rows(out / "predictions/student/dolly/seed20.jsonl")
    assert [r["output"] for r in s10] != [r["output"] for r in s20]


def test_changed_settings_are_refused(run, capsys):
    out, args = run
    changed = [a if a != "8" else "5" for a in args]  # --max-new-tokens 5
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "max_new_tokens: 8 then, 5 now" in err and "--overwrite" in err and "seed10.jsonl" in err
    assert main(args + ["--no-repeat-ngram-size", "0"]) == 2
    assert "no_repeat_ngram_size: 6 then, 0 now" in capsys.readouterr().err
    assert main(args + ["--prompt-overflow", "drop"]) == 2
    assert "prompt_overflow: 'truncate' then, 'drop' now" in capsys.readouterr().err


def test_greedy_and_several_samples(tmp_path, model_dirs):
    kw = dict(limit=2, max_new_tokens=6, progress=False)
    a = evaluate_models([model_dirs["student"]], ["dolly"], [10, 20], tmp_path / "a", greedy=True, **kw)
    evaluate_models([model_dirs["student"]], ["dolly"], [99], tmp_path / "b", greedy=True, **kw)
    assert a["settings"]["seeds"] == [10] and a["settings"]["greedy"]
    ga = read_rows(tmp_path / "a/predictions/student/dolly/seed10.jsonl")
    gb = read_rows(tmp_path / "b/predictions/student/dolly/seed99.jsonl")
    assert [r["output"] for r in ga] == [r["output"] for r in gb]  # greedy ignores the seed

    evaluate_models([model_dirs["student"]], ["dolly"], [10], tmp_path / "k", num_samples=3, **kw)
    evaluate_models([model_dirs["student"]], ["dolly"], [10], tmp_path / "one", **kw)
    rows = read_rows(tmp_path / "k/predictions/student/dolly/seed10.jsonl")
    single = read_rows(tmp_path / "one/predictions/student/dolly/seed10.jsonl")
    for r, s in zip(rows, single):
        assert len(r["outputs"]) == 3 and len(set(r["outputs"])) > 1
        assert r["outputs"][0] == s["output"]  # sample 0 is the single-sample prediction
        assert r["rougeL"] == pytest.approx(statistics.fmean(r["rougeL_samples"]))


def test_lora_adapter_folder_equals_its_merged_model(tmp_path, model_dirs):
    import torch
    from peft import LoraConfig, get_peft_model

    base = load_model(model_dirs["student"], trainable=True)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(tmp_path / "merged"))
    load_tokenizer(model_dirs["student"]).save_pretrained(str(tmp_path / "merged"))
    res = evaluate_models([f"lora={tmp_path / 'adapter'}", f"merged={tmp_path / 'merged'}",
                           f"base={model_dirs['student']}"], ["vicuna"], [10], tmp_path / "out", limit=3,
                          max_new_tokens=8, progress=False)
    pred = {n: read_rows(tmp_path / "out/predictions" / n / "vicuna/seed10.jsonl") for n in ("lora", "merged", "base")}
    assert pred["lora"] == pred["merged"]
    assert [r["output"] for r in pred["lora"]] != [r["output"] for r in pred["base"]]
    assert res["models"]["lora"]["kind"] == "local"


@pytest.mark.parametrize("argv, message", [
    (["nope-bench"], "unknown benchmark 'nope-bench'"),
    (["dolly", "--seeds", "10,x"], "--seeds must be comma-separated integers"),
    (["dolly", "--max-new-tokens", "0"], "max-new-tokens must be at least 1"),
    (["dolly", "--no-repeat-ngram-size", "-1"], "no-repeat-ngram-size must be an integer >= 0"),
])
def test_bad_options_are_clear_errors(model_dirs, tmp_path, capsys, argv, message):
    rc = main(["eval", model_dirs["student"], "--out", str(tmp_path), "--benchmarks", *argv])
    assert rc == 2 and message in capsys.readouterr().err


def test_bad_models_are_clear_errors(model_dirs, tmp_path, capsys):
    assert main(["eval", model_dirs["student"], f"student={model_dirs['teacher']}", "--out", str(tmp_path)]) == 2
    assert "two models share the name 'student'" in capsys.readouterr().err
    assert main(["eval", "openai:no-url", "--out", str(tmp_path)]) == 2
    assert "openai:MODEL_NAME@BASE_URL" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing-model"), "--out", str(tmp_path), "--limit", "1"]) == 2
    assert "missing-model" in capsys.readouterr().err


def test_max_prompt_length_option_and_an_emptied_benchmark(tmp_path, model_dirs, tokenizer):
    exs = load_examples("vicuna").examples[:8]
    lengths = [len(tokenizer(format_prompt(e), add_special_tokens=False)["input_ids"]) for e in exs]
    cut = sorted(lengths)[3]  # about half the prompts are longer
    res = evaluate_models([model_dirs["student"]], ["vicuna", "sni"], [10], tmp_path, limit=8, max_new_tokens=2,
                          max_prompt_length=cut, prompt_overflow="drop", progress=False)
    assert res["settings"]["prompt_overflow"] == "drop" and res["settings"]["protocol"].startswith("differs")
    vic = res["models"]["student"]["benchmarks"]["vicuna"]
    assert vic["dropped_ids"] == [e.id for e, n in zip(exs, lengths) if n > cut] and vic["truncated"] == 0
    assert 0 < vic["dropped"] < 8 and vic["n"] == 8 - vic["dropped"]
    sni = res["models"]["student"]["benchmarks"]["sni"]  # every S-NI prompt is longer: nothing to score
    assert sni["n"] == 0 and sni["dropped"] == 8 and sni["mean"] is None
    assert res["models"]["student"]["average"]["mean"] is None
    md = (tmp_path / "results.md").read_text()
    assert "| student | " in md and "| - | - |" in md and (tmp_path / "results.png").stat().st_size > 0


def test_length_order_and_worker_processes_change_no_prediction(run, tmp_path, model_dirs):
    """Batches are cut from the prompts sorted by length, the files keep the benchmark's order, and two worker
    processes write the same files and results as this process."""
    from lmdistill.evaluate.predictors import Item
    from lmdistill.evaluate.run import length_order

    ex = load_examples("dolly").examples[:4]
    items = [Item(e, prompt_ids=[1] * n) for e, n in zip(ex, (5, 2, 9, 2))]
    assert length_order(items) == [1, 3, 0, 2]
    assert length_order([Item(e) for e in ex]) == [0, 1, 2, 3]   # API items: no ids, file order
    out, _ = run
    models = [f"student={model_dirs['student']}", model_dirs["teacher"]]
    kw = dict(limit=LIMIT, max_new_tokens=8, batch_size=3, progress=False)
    par = evaluate_models(models, ["dolly", "sni"], list(SEEDS), tmp_path, workers=2, **kw)
    seq = json.loads((out / "results.json").read_text())
    for name in ("student", Path(model_dirs["teacher"]).name):
        for bench in ("dolly", "sni"):
            assert par["models"][name]["benchmarks"][bench] == seq["models"][name]["benchmarks"][bench]
            for s in SEEDS:
                rows = read_rows(tmp_path / "predictions" / name / bench / f"seed{s}.jsonl")
                assert rows == read_rows(out / "predictions" / name / bench / f"seed{s}.jsonl")
                assert [r["id"] for r in rows] == [e.id for e in load_examples(bench).examples[:LIMIT]]
    assert list(par["models"]) == ["student", Path(model_dirs["teacher"]).name]   # the order asked for
