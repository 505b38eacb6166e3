"""The demo pipeline end to end on the micro models: teacher cache, every method, evaluation, report."""

import dataclasses
import json

import pytest

from lmdistill.demo import ABLATIONS, METHODS, PRESETS, run_demo, teacher_vs_sft, verdicts
from lmdistill.errors import ConfigError

MICRO = dataclasses.replace(PRESETS["quick"], teacher_size="micro", student_size="micro", teacher_steps=3,
                            student_steps=2, eval_limit=3, eval_max_new_tokens=8, max_new_tokens=8, seeds=(10, 20),
                            train_examples=64, batch_size=4, max_length=96, max_prompt_length=80)


def test_demo_pipeline_on_micro_models(tmp_path, capsys):
    out = tmp_path / "micro"
    report = run_demo(MICRO, out, name="micro")
    assert report == out / "report.md"   # --out DIR writes DIR/report.md
    text = report.read_text()
    for m in ("teacher", *METHODS, *ABLATIONS):
        assert f"| {m} |" in text
    assert "## What each MGSR part does (ablations)" in text
    for part in ("SCRG", "DAC-KL", "Span correlation"):
        assert f"- {part} (" in text
    assert "policy.init_threshold=0.5" in text          # the demo's CPU-budget departure is stated
    assert list(out.glob("cache/teacher-*/final"))     # the teacher cache is under DIR too
    assert (out / "training_curves.png").stat().st_size > 1000
    assert (out / "eval" / "results.png").stat().st_size > 1000
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"teacher", *METHODS, *ABLATIONS}
    meta = json.loads((out / "demo.json").read_text())
    assert meta["total_s"] > 0 and set(meta["students"]) == {*METHODS, *ABLATIONS}
    no_scrg = json.loads((out / "methods" / "mgsr-no-scrg" / "config.json").read_text())
    assert no_scrg["policy"]["generator"] == {"name": "student"} and no_scrg["policy"]["name"] == "replay"
    # every method started from the same initial student
    for m in (*METHODS, *ABLATIONS):
        cfg = json.loads((out / "methods" / m / "config.json").read_text())
        assert cfg["student"] == str(out / "student-init") and cfg["seed"] == 42
    assert "report:" in capsys.readouterr().out
    # a second run reuses the cached teacher and the finished students
    run_demo(MICRO, out, name="micro")
    printed = capsys.readouterr().out
    assert "reusing cached teacher" in printed and "reusing sft" in printed
    # a demo of other settings into the same folder would reuse these students: refused before anything runs
    with pytest.raises(ConfigError, match=r"holds the demo of preset 'micro' \(settings that differ: student_steps\)"):
        run_demo(dataclasses.replace(MICRO, student_steps=3), out, name="other")


def test_verdicts_follow_the_numbers():
    def entry(mean, std, dolly=None):
        e = {"mean": mean, "std": std, "seeds": {"10": 0, "20": 0, "30": 0}}
        return {"average": e, "benchmarks": {"dolly": dolly or e}}

    results = {"benchmarks": ["dolly"],
               "models": {"teacher": entry(30, 1, dolly=entry(5, 0.1)["average"]), "sft": entry(10, 0.5),
                          "kd": entry(14, 0.5), "gkd": entry(10.3, 0.5), "seqkd": entry(5, 0.5)}}
    lines = "\n".join(verdicts(results))
    assert "`kd` **beats SFT**" in lines
    assert "`gkd` does **not** beat SFT" in lines
    assert "`seqkd` is **worse than SFT**" in lines
    assert "dolly -5.00 (behind), average +20.00 (ahead)" in teacher_vs_sft(results)[0]


def test_worker_processes_compute_what_one_process_computes(tmp_path):
    """Student runs and evaluation jobs in 2 worker processes give the same weights, training logs, predictions
    and results as running them one after another in this process (the teacher cache is shared)."""
    small = dataclasses.replace(MICRO, methods=("sft", "kd", "gkd", "mgsr"), ablations=("mgsr-no-span",))
    run_demo(small, tmp_path / "seq", name="seq", workers=1, cache=tmp_path / "cache")
    run_demo(small, tmp_path / "par", name="par", workers=2, cache=tmp_path / "cache")
    seq, par = tmp_path / "seq", tmp_path / "par"
    assert json.loads((par / "demo.json").read_text())["workers"] == 2
    assert "2 worker processes" in (par / "report.md").read_text()

    def logged(path):   # the training log without its clock (tokens_per_s)
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                for line in path.read_text().splitlines()]

    for m in (*small.methods, *small.ablations):
        weights = [(d / "methods" / m / "final" / "model.safetensors").read_bytes() for d in (seq, par)]
        assert weights[0] == weights[1], m
        assert logged(seq / "methods" / m / "metrics.jsonl") == logged(par / "methods" / m / "metrics.jsonl"), m
    for f in sorted((seq / "eval" / "predictions").rglob("*.jsonl")):
        assert f.read_text() == (par / f.relative_to(seq)).read_text(), f
    results = [json.loads((d / "eval" / "results.json").read_text())["models"] for d in (seq, par)]
    for r in results:   # the folders differ (seq/ and par/); every number must not
        for entry in r.values():
            entry.pop("source")
    assert results[0] == results[1] and list(results[1]) == ["teacher", *small.methods, *small.ablations]
