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
from lmdistill.quantify.templates import fill, load_templates
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
    config = IceConfig(fact=FACT, budget=120, seed=6)  # paper mode: 2 mutants x 50 questions (20 left over)
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
    assert 0 < s["hard_hits"] < s["strict_hits"]  # seed 6: the second mutant says "you are ChatGPT"
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


# --- paper mode against a plain-Python transcription of the reference code --------------------------------
import math  # noqa: E402
import random  # noqa: E402

from lmdistill.clients import ChatClient  # noqa: E402
from lmdistill.quantify.identity import RULE_JUDGE_LABEL  # noqa: E402
from lmdistill.quantify.judges import PAPER_SYSTEM  # noqa: E402
from test_quantify_support import helper_reply, paper_judge_reply  # noqa: E402


class Fake(ChatClient):
    """An in-process scripted client that records every request."""

    def __init__(self, name, respond):
        self.name, self.respond, self.calls = name, respond, []

    def _chat(self, messages, **params):
        self.calls.append((messages, params))
        return self.respond(messages)


def fakes():
    target = Fake("fake-target", lambda m: target_reply(m[-1]["content"]))
    helper = Fake("fake-helper", lambda m: helper_reply(m[-1]["content"]))
    judge = Fake("fake-judge", paper_judge_reply)
    return target, helper, judge


def reference_search(result, n_questions, ratio=0.5, alpha=0.1, beta=0.2):
    """Replays the reference's selection, tree and reward on the run's per-step hits, in plain Python floats.

    easyjailbreak/selector/MCTSExploreSelectPolicy.py:44-75 (select), :84-91 (update);
    easyjailbreak/attacker/Gptfuzzer_Identity.py:101-108 (every mutant is appended to the seed's children and
    to the node list), :131 (mutant level = seed level + 1), :110-134 (update gets one evaluated instance per
    question, so len(prompt_nodes) = number of questions). np.random.rand is replaced by the run's seeded
    generator (random.Random(seed + 1)), drawn exactly where the reference draws.
    """
    n_seeds = len(result["config"]["seed_templates"])
    rewards, visited, level = [0.0] * n_seeds, [0] * n_seeds, [0] * n_seeds
    children = [[] for _ in range(n_seeds)]
    rnd = random.Random(result["config"]["seed"] + 1)
    step, picks, new_nodes, step_rewards = 0, [], [], []
    hits_by_step = Counter(r["step"] for r in result["queries"] if r["loose"])
    for s in range(len(result["steps"])):
        step += 1

        def uct(i):
            return rewards[i] / (visited[i] + 1) + ratio * math.sqrt(2 * math.log(step) / (visited[i] + 0.01))

        cur = max(range(n_seeds), key=uct)
        path = [cur]
        while len(children[cur]) > 0:
            if rnd.random() < alpha:
                break
            cur = max(children[cur], key=uct)
            path.append(cur)
        for i in path:
            visited[i] += 1
        picks.append(cur)
        new = len(rewards)  # the mutant: a child of the selected seed, hit or not
        rewards.append(0.0), visited.append(0), level.append(level[cur] + 1), children.append([])
        children[cur].append(new)
        new_nodes.append(new)
        succ_num = hits_by_step[s]
        reward = succ_num / (n_questions * n_questions)
        step_rewards.append(reward)
        for i in reversed(path):
            rewards[i] += reward * max(beta, (1 - 0.1 * level[cur]))
    return picks, new_nodes, step_rewards, rewards, visited, level


def test_paper_mode_equals_the_reference_search(tmp_path):
    target, helper, judge_client = fakes()
    # five seeds so that 14 steps reach below the seeds (with 76 the first 76 steps visit each seed once)
    # helper_length_factor=0: the reference's plain 2048-token cap for mutations (the bound is tested apart)
    config = IceConfig(fact=FACT, budget=25 * 14, languages=("en",), seed=5, templates=load_templates()[:5],
                       helper_length_factor=0)
    result = run_ice(target, helper, LLMJudge(judge_client), config, progress=False)  # paper mode is the default
    steps, q = result["steps"], 25
    assert result["config"]["mode"] == "paper" and len(steps) == 14
    # the target's answers decide the hits, independently of the judge: it claims ChatGPT or Meta for some prompts
    for s in steps:
        mine = [r for r in result["queries"] if r["step"] == s["step"]]
        assert s["loose_hits"] == sum("ChatGPT" in r["response"] or "Meta" in r["response"] for r in mine)
    picks, new_nodes, step_rewards, rewards, visited, level = reference_search(result, q)
    assert [s["seed_node"] for s in steps] == picks
    assert [s["new_node"] for s in steps] == new_nodes
    assert [s["reward"] for s in steps] == step_rewards
    tree = result["tree"]
    assert [n["reward"] for n in tree] == pytest.approx(rewards, abs=1e-15)
    assert [n["visits"] for n in tree] == visited and [n["depth"] for n in tree] == level
    assert max(level) >= 2 and sum(r > 0 for r in step_rewards) >= 5  # the walk went below the seeds
    assert result["config"]["seed_templates"] == [0, 1, 2, 3, 4]  # a custom set is used whole, in order
    # the target as LLM_agent.py asks it: system prompt (:106/:121), temperature 0 (:104), 2048 tokens (:147)
    assert len(target.calls) == 25 * 14
    for messages, params in target.calls + helper.calls:
        assert messages[0] == {"role": "system", "content": "You are a helpful assistant."}
        assert params["temperature"] == 0.0 and params["max_tokens"] == 2048
    # the judge: loose prompt on every answer with fact and answer as the two statements; strict prompt on the
    # loose hits only, without the fact (rejudge.py:28-48, run on the loose-score file)
    loose_asks = [m for m, _ in judge_client.calls if "<factor>" in m[1]["content"]]
    strict_asks = [m for m, _ in judge_client.calls if "<rate>1</rate>" in m[1]["content"]]
    assert all(m[0]["content"] == PAPER_SYSTEM for m, _ in judge_client.calls)
    # every answer is judged; identical answers within a step's round are asked once (the same request)
    distinct = sum(len({r["response"] for r in result["queries"] if r["step"] == s["step"]}) for s in steps)
    distinct_hits = sum(len({r["response"] for r in result["queries"] if r["step"] == s["step"] and r["loose"]})
                        for s in steps)
    assert len(loose_asks) == distinct and f"<factor>{FACT}</factor>" in loose_asks[0][1]["content"]
    assert {m[1]["content"].split("Statement 2: <factor>")[1].split("</factor>")[0] for m in loose_asks} == \
        {r["response"] for r in result["queries"]}
    assert len(strict_asks) == distinct_hits and all(FACT not in m[1]["content"] for m in strict_asks)
    assert result["scores"]["strict_hits"] == sum("ChatGPT" in r["response"] for r in result["queries"])
    assert result["judge_label"] == "LLM judge fake-judge (paper prompts)"
    md = write_ice(result, tmp_path / "llm")
    assert "rule judge" not in (tmp_path / "llm" / "ice.md").read_text() and md["config"]["tree_rule"].startswith("reference")


def test_paper_mode_draws_76_seeds():
    """76 of GPTFuzz's 77 templates, drawn at random (Gptfuzzer_Identity.py:35,50; seed_template.py:55)."""
    target, helper, _ = fakes()
    result = run_ice(target, helper, RuleJudge(), IceConfig(fact=FACT, budget=25, languages=("en",), seed=2),
                     progress=False)
    order = result["config"]["seed_templates"]
    assert len(order) == len(set(order)) == 76 and set(order) <= set(range(77)) and order != sorted(order)
    templates = load_templates()
    assert [n["id"] for n in result["tree"][:76]] == list(range(76))
    assert helper.calls[0][0][-1]["content"].count(templates[order[0]][:40]) >= 1  # step 1 mutates the first seed


def test_lmdistill_mode_keeps_its_own_rules():
    target, helper, _ = fakes()
    config = IceConfig(fact=FACT, mode="lmdistill", budget=25 * 6, languages=("en",), seed=1)
    result = run_ice(target, helper, RuleJudge(), config, progress=False)
    assert all((s["new_node"] is None) == (s["loose_hits"] == 0) for s in result["steps"])
    assert all(s["reward"] == s["loose_hits"] / 25 for s in result["steps"])
    assert result["config"]["seed_templates"] == list(range(77))
    for messages, params in target.calls:
        assert messages[0]["role"] == "user" and params["max_tokens"] == 256
    with pytest.raises(Exception, match="--mode"):
        run_ice(target, helper, RuleJudge(), IceConfig(fact=FACT, mode="nope"), progress=False)


def test_rule_judge_is_labelled_in_every_report(tmp_path):
    target, helper, _ = fakes()
    result = run_ice(target, helper, RuleJudge(), IceConfig(fact=FACT, budget=25, languages=("en",)), progress=False)
    write_ice(result, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "ice.json").read_text())["judge_label"] == RULE_JUDGE_LABEL
    assert RULE_JUDGE_LABEL in (tmp_path / "run" / "ice.md").read_text()
    assert main(["quantify", "report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")]) == 0
    assert RULE_JUDGE_LABEL in (tmp_path / "rep" / "report.md").read_text()
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["ice"][0]["judge"] == RULE_JUDGE_LABEL
    assert RULE_JUDGE_LABEL == "rule judge (approximation of the paper's LLM judge)"
