"""Batched quantification (issue 19): rounds of requests through ``chat_many`` give the records of the
one-at-a-time path, send each request once, and a rerun over a partial cache sends only what is missing."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest

from lmdistill.clients import ChatClient, CachedClient, RequestRejected, ResponseCache
from lmdistill.quantify.ice import IceConfig, run_ice
from lmdistill.quantify.identity import RuleJudge
from lmdistill.quantify.judges import LLMJudge, judge_all
from lmdistill.quantify.mutators import MIN_HELPER_TOKENS, mutation_max_tokens
from lmdistill.quantify.rse import judge_pair, judge_pairs, run_rse
from test_quantify_support import FACT, _h, helper_reply, paper_judge_reply, scripted_respond, target_reply


class Fake(ChatClient):
    """A scripted in-process client: records every request, what ``chat_many`` was handed, and how many
    requests were in flight at once (``concurrency`` threads, like a batched local model)."""

    def __init__(self, name, respond, concurrency=1, delay=0.0):
        self.name, self.respond, self.concurrency, self.delay = name, respond, concurrency, delay
        self.calls, self.batches = [], []
        self._lock = threading.Lock()
        self.in_flight = self.peak = 0

    def _chat(self, messages, **params):
        with self._lock:
            self.calls.append((messages, params))
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)
            reply = self.respond(messages)
            if isinstance(reply, Exception):
                raise reply
            return reply
        finally:
            with self._lock:
                self.in_flight -= 1

    def chat_many(self, batch, **kw):
        self.batches.append(len(batch))
        return super().chat_many(batch, **kw)


class OneByOne:
    """A judge seen through ``judge`` only: judge_all falls back to one answer after another (the old path)."""

    def __init__(self, judge):
        self.judge = judge.judge
        self.name, self.label = judge.name, judge.label


def flaky_judge(messages):
    """The paper judge, but some first replies are malformed (re-asked) and one answer is rejected."""
    text = messages[-1]["content"]
    if "REJECT-ME" in text:
        return RequestRejected("too long", 400)
    if len(messages) == 2 and _h(text) % 3 == 0:
        return "I cannot decide."  # no tag: a re-ask follows
    return paper_judge_reply(messages) or "<judge>0</judge>"


def make_fakes(concurrency=1, judge=flaky_judge, delay=0.0):
    return (Fake("t", lambda m: target_reply(m[-1]["content"]), concurrency, delay),
            Fake("h", lambda m: helper_reply(m[-1]["content"]), concurrency, delay),
            Fake("j", judge, concurrency, delay))


def request_multiset(fake):
    return Counter(json.dumps([m, p], sort_keys=True) for m, p in fake.calls)


@pytest.mark.parametrize("mode", ["paper", "lmdistill"])
def test_batched_ice_equals_the_one_by_one_path(mode):
    config = IceConfig(fact=FACT, mode=mode, budget=50 * 3, seed=4)
    t1, h1, j1 = make_fakes(concurrency=1)
    seq = run_ice(t1, h1, OneByOne(LLMJudge(j1)), config, progress=False)
    t8, h8, j8 = make_fakes(concurrency=8, delay=0.005)
    bat = run_ice(t8, h8, LLMJudge(j8), config, progress=False)
    for k in ("scores", "per_language", "per_mutator", "steps", "tree", "queries", "config"):
        assert bat[k] == seq[k], k
    assert bat["scores"]["unparsable"] == 0 and any(r["loose"] for r in bat["queries"])
    # the same requests (the same cache keys), target and helper one for one
    assert request_multiset(t8) == request_multiset(t1) and request_multiset(h8) == request_multiset(h1)
    # the judge: the same distinct requests; identical answers within a round are asked once, not once each
    # (without a cache, once per round: 3 steps)
    assert set(request_multiset(j8)) == set(request_multiset(j1))
    assert max(request_multiset(j8).values()) <= 3 < max(request_multiset(j1).values())
    # a step's 50 target queries in one chat_many, its loose questions in one, with requests in flight together
    assert t8.batches == [50, 50, 50] and t8.peak > 1 and j8.batches[0] > 1 and j8.peak > 1


def test_judge_many_equals_judge_one_by_one():
    answers = [target_reply(f"q{i}") for i in range(12)] + ["REJECT-ME please", "I am ChatGPT by OpenAI."] * 2
    one = [LLMJudge(Fake("j", flaky_judge)).judge(a, FACT) for a in answers]
    fake = Fake("j", flaky_judge, concurrency=4)
    many = judge_all(LLMJudge(fake), answers, FACT)
    assert many == one
    assert any(v.unparsable for v in many) and any(v.strict for v in many)
    assert judge_all(RuleJudge(), answers, FACT) == [RuleJudge().judge(a, FACT) for a in answers]
    # re-asks happened (conversations of 4 messages) and the duplicated answers were asked once
    assert any(len(m) == 4 for m, _ in fake.calls) and max(request_multiset(fake).values()) == 1


def test_rse_judge_pairs_equal_judge_pair():
    def judge(messages):
        text = messages[1]["content"]
        if "REJECT" in text:
            return RequestRejected("too long", 400)
        if _h(text) % 5 == 0:
            return "no scores at all"  # malformed every time: gives up after the re-asks
        return scripted_respond(messages, {})

    pairs = [(f"prompt {i}", f"reference {i}", f"response {i}") for i in range(40)] + [("REJECT", "a", "b")]
    one = [judge_pair(Fake("j", judge), *p) for p in pairs]
    many = judge_pairs(Fake("j", judge, concurrency=4), pairs)
    assert many == one
    requests = [r for _, r, _ in many]
    assert {1, 2, 3} <= set(requests)  # first-time, re-asked once, gave up after two re-asks
    assert any(e and e.startswith("judge rejected") for _, _, e in many)
    assert any(e and e.startswith("malformed judge reply after 3") for _, _, e in many)


def test_batched_rse_equals_sequential():
    sets = {"s": [{"id": str(i), "prompt": f"Explain topic {i}."} for i in range(12)]}

    def run(concurrency):
        t = Fake("t", lambda m: f"Answer to {m[-1]['content']}", concurrency)
        r = Fake("r", lambda m: f"# Reference\n\n{m[-1]['content']}", concurrency)
        j = Fake("j", lambda m: scripted_respond(m, {}), concurrency, delay=0.005)
        return run_rse(t, r, sets, judge=j, max_tokens=8, progress=False), j

    (seq, j1), (bat, j4) = run(1), run(4)
    assert bat == seq and request_multiset(j4) == request_multiset(j1)
    assert any(r["judge_requests"] == 2 for r in bat["items"]) and bat["judge_scores"]["unparsable"] == 0
    assert j4.batches[0] == 12 and j4.peak > 1


def test_rerun_over_a_partial_cache_sends_only_the_missing_requests(tmp_path):
    config = IceConfig(fact=FACT, budget=100, seed=3)
    path = tmp_path / "cache.jsonl"

    def run(concurrency):
        t, h, j = make_fakes(concurrency)
        cache = ResponseCache(path)
        clients = [CachedClient(c, cache) for c in (t, h, j)]
        result = run_ice(clients[0], clients[1], LLMJudge(clients[2]), config, progress=False)
        cache.close()
        return result, (t, h, j)

    full, fakes = run(8)
    paid = sum(len(f.calls) for f in fakes)
    lines = path.read_text().splitlines()
    assert len(lines) == paid  # every request paid once, and cached once
    again, fakes2 = run(8)
    assert again == full and sum(len(f.calls) for f in fakes2) == 0  # all from the cache
    # a kill -9 in the middle of a round: the cache holds some of its answers, scattered
    kept = [l for i, l in enumerate(lines) if i % 3 != 1]
    path.write_text("\n".join(kept) + "\n" + lines[1][: len(lines[1]) // 2])  # and a torn last line
    resumed, fakes3 = run(8)
    assert resumed == full
    sent = [json.dumps([m, p], sort_keys=True) for f in fakes3 for m, p in f.calls]
    assert len(sent) == len(set(sent)) == len(lines) - len(kept)  # exactly the missing ones, each once
    keys = [json.loads(l)["key"] for l in path.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == len(lines)


def test_mutants_per_round_batches_mutations_deterministically():
    def run(k):
        t, h, j = make_fakes(concurrency=4)
        h.delay = 0.02  # so the round's mutations overlap
        config = IceConfig(fact=FACT, budget=50 * 6 + 7, seed=1, mutants_per_round=k)
        return run_ice(t, h, LLMJudge(j), config, progress=False), t, h

    one, _, _ = run(1)
    a, ta, ha = run(3)
    b, _, _ = run(3)
    assert a == b  # deterministic in seed and K
    assert len(a["steps"]) == 6 and a["config"]["mutants_per_round"] == 3 and a["config"]["unused_budget"] == 7
    assert [s["step"] for s in a["steps"]] == list(range(6))
    assert ta.batches == [150, 150] and ha.peak > 1  # a round: 3 mutants x 50 questions, mutations together
    # a round's selections come before its rewards: the first round equals K = 1 only where no reward mattered
    assert [s["seed_node"] for s in a["steps"][:3]] == [s["seed_node"] for s in one["steps"][:3]]
    with pytest.raises(Exception, match="mutants-per-round"):
        run_ice(*make_fakes()[:2], RuleJudge(), IceConfig(fact=FACT, mutants_per_round=0), progress=False)


def test_helper_length_bound():
    seed = "x" * 4000  # 1000 estimated tokens
    assert mutation_max_tokens("rephrase", seed, max_tokens=2048, length_factor=0) == 2048
    assert mutation_max_tokens("rephrase", seed, max_tokens=2048, length_factor=2) == 2000
    assert mutation_max_tokens("crossover", seed, seed, max_tokens=2048, length_factor=2) == 2048
    assert mutation_max_tokens("crossover", "ab" * 200, "c" * 400, max_tokens=2048, length_factor=2) == 400
    assert mutation_max_tokens("expand", seed, max_tokens=2048, length_factor=2) == MIN_HELPER_TOKENS
    assert mutation_max_tokens("shorten", "tiny", max_tokens=2048, length_factor=2) == MIN_HELPER_TOKENS
    # in a run: each mutation's request carries its bound; the reference's plain cap with factor 0
    for factor in (0, 2):
        t, h, _ = make_fakes()
        run_ice(t, h, RuleJudge(), IceConfig(fact=FACT, budget=25 * 4, languages=("en",), seed=2,
                                             helper_length_factor=factor), progress=False)
        caps = [p["max_tokens"] for _, p in h.calls]
        if factor == 0:
            assert caps == [2048] * 4
        else:
            assert all(MIN_HELPER_TOKENS <= c <= 2048 for c in caps) and caps != [2048] * 4


def test_batched_whitebox_equals_one_prompt_at_a_time(model_dirs):
    """Greedy answers from the batched sequence engine and batched teacher-forced scoring give what the
    pre-batching code gave prompt by prompt (HF ``generate`` greedy, then ``compare_on``)."""
    import torch

    from lmdistill.models import load_model, load_tokenizer
    from lmdistill.quantify.whitebox import _prompt_ids, _stop_ids, compare_on, run_whitebox

    items = [{"id": str(i), "prompt": p} for i, p in enumerate(
        ["Hi", "Give three tips for staying healthy.", "What is the capital of France? Answer briefly.", "Poem",
         "Tell me about the sea and the wind in two sentences."])]
    teacher, student = load_model(model_dirs["teacher"]), load_model(model_dirs["padded_student"])
    tok = load_tokenizer(model_dirs["teacher"])
    eos = _stop_ids(teacher, tok)
    expected = []
    for it in items:  # the old path, one prompt at a time
        ids = _prompt_ids(tok, it["prompt"])
        with torch.inference_mode():
            out = teacher.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=10, do_sample=False, pad_token_id=min(eos))
        resp = out[0, len(ids):].tolist()
        cut = next((i + 1 for i, t in enumerate(resp) if t in eos), len(resp))
        expected.append(compare_on(teacher, student, ids + resp[:cut], len(ids)))
    runs = {b: run_whitebox(model_dirs["teacher"], model_dirs["padded_student"], items, max_new_tokens=10,
                            device="cpu", progress=False, batch_size=b) for b in (1, 3)}
    for run in runs.values():
        assert [r["tokens"] for r in run["items"]] == [e["tokens"] for e in expected]
        for r, e in zip(run["items"], expected):
            assert r["kl_sum"] == pytest.approx(e["kl_sum"], rel=1e-4, abs=1e-5)
            assert r["agree_sum"] == e["agree_sum"]
    assert runs[1]["kl_mean"] == pytest.approx(runs[3]["kl_mean"], rel=1e-5)


def test_ice_with_a_batched_local_target_equals_the_unbatched_one(model_dirs, tmp_path):
    """A local target decoding a step's 25 questions as one batch answers as it does one at a time; a rerun
    over the cache asks the model nothing."""
    from lmdistill.clients.chat import LocalChatClient

    config = IceConfig(fact=FACT, budget=50, languages=("en",), seed=0, max_tokens=6)
    results = {}
    for batch in (0, 8):
        local = LocalChatClient(model_dirs["teacher"], device="cpu", name="micro", max_batch_size=batch)
        assert local.concurrency == max(batch, 1)
        cache = ResponseCache(tmp_path / f"cache-{batch}.jsonl")
        target = CachedClient(local, cache)
        helper = Fake("h", lambda m: helper_reply(m[-1]["content"]))
        results[batch] = run_ice(target, helper, RuleJudge(), config, progress=False)
        assert target.misses == 50
        again = run_ice(CachedClient(local, cache), helper, RuleJudge(), config, progress=False)
        assert again == results[batch]
        local.close()
        cache.close()
    assert results[8]["queries"] == results[0]["queries"] and results[8]["steps"] == results[0]["steps"]
    assert all(isinstance(r["response"], str) and r["response"] for r in results[8]["queries"])
