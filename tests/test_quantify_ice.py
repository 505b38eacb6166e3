"""ICE end to end over real HTTP: scripted helper/judge/target servers, the served micro model, faults,
and kill -9 of a running ``lmdistill quantify ice`` followed by a rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from lmdistill.cli import main
from lmdistill.clients import ResponseCache, make_client
from lmdistill.models import load_model_and_tokenizer
from lmdistill.quantify.ice import IceConfig, run_ice, write_ice
from lmdistill.quantify.identity import RuleJudge, find_names
from lmdistill.quantify.judges import LLMJudge
from lmdistill.quantify.questions import identity_questions
from lmdistill.quantify.templates import fill
from lmdistill.serve import ServerThread, create_app
from test_quantify_support import FACT, start_scripted, target_reply


@pytest.fixture(scope="module")
def scripted():
    srv, app = start_scripted()
    yield srv
    srv.stop()


def spec(srv, name):
    return f"openai:{name}@{srv.base_url}"


def clients(srv, cache, **kw):
    kw = {"base_delay": 0.001, "max_delay": 0.01, "timeout": 5.0, "cache": cache, **kw}
    return make_client(spec(srv, "target"), **kw), make_client(spec(srv, "helper"), **kw)


def test_ice_scores_with_rule_and_llm_judge(scripted, tmp_path):
    config = IceConfig(fact=FACT, budget=120, seed=3)  # 2 mutants x 50 questions (20 left over)
    cache = ResponseCache(tmp_path / "cache.jsonl")
    target, helper = clients(scripted, cache)
    result = run_ice(target, helper, RuleJudge(), config, progress=False)
    rows = result["queries"]
    assert len(rows) == 100 and result["config"]["mutants"] == 2
    # independent expectation: the scripted target's answer decides each verdict
    expect_loose = sum("ChatGPT" in r["response"] or "Meta" in r["response"] for r in rows)
    expect_strict = sum("ChatGPT" in r["response"] for r in rows)
    for r in rows:
        assert r["response"] == target_reply(r["response"] and _prompt(result, r))
    s = result["scores"]
    assert 0 < expect_strict < expect_loose
    assert (s["loose_hits"], s["strict_hits"]) == (expect_loose, expect_strict)
    assert s["loose"] == round(expect_loose / 100, 4)

    def names_other_models(row):  # independent of misleading_names: any non-TinyStudent name in the prompt
        return bool(find_names(_prompt(result, row)))

    assert s["hard_hits"] == sum(r["strict"] and not names_other_models(r) for r in rows)
    assert 0 < s["hard_hits"] < s["strict_hits"]  # seed 3: one mutant says "you are ChatGPT"
    assert all(r["misleading"] == [] for r in rows if r["question"] not in ("en-20", "zh-20", "en-22", "zh-22")
               and not result["steps"][r["step"]]["misleading_names"])
    pl = result["per_language"]
    assert pl["en"]["queries"] == pl["zh"]["queries"] == 50
    assert pl["en"]["loose_hits"] + pl["zh"]["loose_hits"] == expect_loose
    # the LLM judge path (scripted judge server, verdict lines parsed) gives the same verdicts
    judge = LLMJudge(make_client(spec(scripted, "judge"), base_delay=0.001, cache=cache, concurrency=2))
    again = run_ice(target, helper, judge, config, progress=False)
    assert again["scores"] == result["scores"] and again["judge"].startswith("openai:judge")
    summary = write_ice(result, tmp_path / "out")
    for name in ("ice.json", "ice_queries.jsonl", "ice.md", "ice.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "| Loose |" in (tmp_path / "out" / "ice.md").read_text() and summary["scores"] == s


def _prompt(result, row):
    q = {x.id: x.text for x in identity_questions()}[row["question"]]
    return fill(result["steps"][row["step"]]["template"], q)


def test_ice_survives_faults_identically(scripted, tmp_path):
    config = IceConfig(fact=FACT, budget=100, seed=2)
    base = run_ice(*clients(scripted, ResponseCache(tmp_path / "a.jsonl")), RuleJudge(), config, progress=False)
    faults = {3: 500, 7: 429, 11: ("hang", 2.0), 20: 503, 21: 500, 40: 429, 77: 502}
    srv, app = start_scripted(fault=lambda n, b: faults.get(n))
    try:
        cache = ResponseCache(tmp_path / "b.jsonl")
        target, helper = clients(srv, cache, timeout=0.5, concurrency=4)
        target.name, helper.name = base["target"], base["helper"]  # same names: same cache keys and report
        target.client.name, helper.client.name = base["target"], base["helper"]
        faulty = run_ice(target, helper, RuleJudge(), config, progress=False)
    finally:
        srv.stop()
    assert faulty["scores"] == base["scores"] and faulty["queries"] == base["queries"]
    keys = [json.loads(l)["key"] for l in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 102  # 100 target answers + 2 mutations, none lost or doubled
    ok = Counter(json.dumps([c["messages"], c["params"].get("model")]) for c in app.state.calls if c["outcome"] == "ok")
    assert max(ok.values()) == 1


def test_ice_cli_against_served_micro_model(model_dirs, scripted, tmp_path):
    model, tok = load_model_and_tokenizer(model_dirs["student"])
    with ServerThread(create_app(model, tok, model_name="micro", max_tokens_limit=32)) as micro:
        out = tmp_path / "ice"
        rc = main(["quantify", "ice", "--target", spec(micro, "micro"), "--fact", FACT, "--helper",
                   spec(scripted, "helper"), "--judge", spec(scripted, "judge"), "--budget", "50", "--max-tokens", "8",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "ice.json").read_text())
    assert summary["scores"]["queries"] == 50 and summary["scores"]["errors"] == 0
    assert summary["scores"]["loose"] == 0.0  # the micro model's gibberish claims no identity
    assert (out / "ice.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(l) for l in (out / "ice_queries.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and all(isinstance(r["response"], str) for r in rows)
    assert summary["judge"] == spec(scripted, "judge") and summary["scores"]["unparsable"] == 0
    cached = [json.loads(l)["model"] for l in (out / "cache.jsonl").read_text().splitlines()]
    distinct = len({r["response"] for r in rows})  # identical answers are judged (and paid) once
    assert Counter(cached) == {spec(micro, "micro"): 50, spec(scripted, "helper"): 1, spec(scripted, "judge"): distinct}


def test_ice_cli_errors_cleanly(scripted, tmp_path, capsys):
    args = ["quantify", "ice", "--target", spec(scripted, "t"), "--helper", spec(scripted, "h"), "--out", str(tmp_path)]
    assert main(args + ["--fact", "x", "--budget", "10"]) == 2
    assert "budget" in capsys.readouterr().err
    assert main(args + ["--fact", "x", "--languages", "fr"]) == 2
    assert main(["quantify", "ice", "--target", "openai:bad", "--helper", "h", "--fact", "x", "--out", str(tmp_path)]) == 2


def test_kill_minus_9_and_rerun_equals_uninterrupted(tmp_path):
    slow = lambda n, b: ("hang", 0.03)  # noqa: E731 - every answer takes a little while
    srv, app = start_scripted(fault=slow)
    try:
        def cmd(out):
            return [sys.executable, "-m", "lmdistill", "quantify", "ice", "--target", spec(srv, "target"),
                    "--helper", spec(srv, "helper"), "--fact", FACT, "--budget", "150", "--concurrency", "1",
                    "--out", str(out), "--no-progress"]

        out = tmp_path / "run"
        env = {**os.environ, "OPENAI_API_KEY": "k", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        cache = out / "cache.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if cache.exists() and cache.read_text().count("\n") >= 60:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        lines_at_kill = cache.read_text().count("\n")
        assert 60 <= lines_at_kill < 153 and not (out / "ice.json").exists()
        calls_before = len(app.state.calls)
        rerun = subprocess.run(cmd(out), env=env, capture_output=True, text=True, timeout=180)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        asked_again = [c for c in app.state.calls[calls_before:]]
        assert len(asked_again) <= 153 - lines_at_kill + 1  # only the missing ones (+1 in flight at the kill)
        keys = [json.loads(l)["key"] for l in cache.read_text().splitlines()]
        assert len(keys) == len(set(keys)) == 153
        # an uninterrupted run, in-process, into a fresh folder
        assert main(cmd(tmp_path / "clean")[3:]) == 0
    finally:
        srv.stop()
    for name in ("ice.json", "ice_queries.jsonl", "ice.md"):
        assert (out / name).read_text() == (tmp_path / "clean" / name).read_text()
