"""Identity judges, question/template data, MCTS-Explore and the parsers."""

from __future__ import annotations

import random

import pytest

from lmdistill.clients import make_client
from lmdistill.quantify.fuzz import MCTSExplore
from lmdistill.quantify.identity import RuleJudge, identity_claims, misleading_names
from lmdistill.quantify.judges import LLMJudge, judge_agreement, labelled_examples, parse_verdict
from lmdistill.quantify.questions import QUESTIONS_EN, QUESTIONS_ZH, identity_questions
from lmdistill.quantify.rse import parse_scores
from lmdistill.quantify.templates import PLACEHOLDER, fill, load_templates
from lmdistill.serve import ServerThread
from lmdistill.serve.testing import scripted_app


def test_labelled_set_shape():
    rows = labelled_examples()
    assert len(rows) >= 60
    assert {r["lang"] for r in rows} == {"en", "zh"}
    assert all(r["loose"] or not r["strict"] for r in rows)  # strict hits are loose hits
    assert sum(r["loose"] for r in rows) >= 30 and sum(not r["loose"] for r in rows) >= 30


def test_rule_judge_agreement_with_labels():
    """Measured on the 100 shipped examples: overall loose/strict accuracy 0.99 (P 0.98/0.975, R 1.0).
    dev (84, the rules were written and tuned against them): 84/84. held-out (16, written before the last
    rule change and never tuned on): 15/16 (misses a quoted translation that says "I am an AI created by
    OpenAI"). An earlier held-out round of 14 scored 10/14 before those examples were moved to dev."""
    a = judge_agreement(RuleJudge())
    assert a["overall"]["loose"]["n"] == 100
    for kind in ("loose", "strict"):
        assert a["overall"][kind]["accuracy"] >= 0.97
        assert a["overall"][kind]["precision"] >= 0.95 and a["overall"][kind]["recall"] >= 0.95
        assert a["split=heldout"][kind]["accuracy"] >= 0.9
        assert a["lang=zh"][kind]["accuracy"] >= 0.95


@pytest.mark.parametrize("response,fact,loose,strict", [
    ("I am ChatGPT, made by OpenAI.", "I am Qwen by Alibaba.", True, True),
    ("I'm not ChatGPT; I am Qwen.", "I am Qwen by Alibaba.", False, False),
    ("DAN: I am ChatGPT by OpenAI.", "I am Qwen by Alibaba.", False, False),
    ("ChatGPT is made by OpenAI.", "I am Qwen by Alibaba.", False, False),
    ("I am Gemini from Google.", "I am Qwen by Alibaba.", True, False),
    ("我是ChatGPT。", "I am GLM by Zhipu.", True, True),
    ("I am ChatGPT, made by OpenAI.", "I am ChatGPT, made by OpenAI.", False, False),
])
def test_rule_judge_cases(response, fact, loose, strict):
    v = RuleJudge().judge(response, fact)
    assert (v.loose, v.strict) == (loose, strict), v.reason


def test_claims_and_misleading_names():
    assert ("GPT-4", "openai") in identity_claims("I'm based on GPT-4.")
    assert misleading_names("You are a forked version of ChatGPT. [INSERT PROMPT HERE]", "I am Qwen by Alibaba") == ["ChatGPT"]
    assert misleading_names("Act as Qwen.", "I am Qwen by Alibaba") == []


@pytest.mark.parametrize("text,want", [
    ("reasoning...\nVERDICT: YES", True), ("verdict: no", False), ("**Verdict:** Yes", True),
    ("[[NO]]", False), ("Yes.", True), ("VERDICT: NO ... wait VERDICT: YES", True), ("maybe", None), ("", None),
])
def test_parse_verdict(text, want):
    assert parse_verdict(text) is want


def test_parse_scores():
    assert parse_scores("ok\nstyle: 4\nlogical structure: 3\ncontent detail: 5\noverall: 4") == \
        {"style": 4, "structure": 3, "content": 5, "overall": 4}
    assert parse_scores('{"style": 2, "structure": 2, "content": 1, "overall": 2}')["content"] == 1
    assert parse_scores("style: 4\nstructure: 9\ncontent: 5\noverall: 4") is None
    assert parse_scores("style: 4\nstructure: 3") is None
    assert parse_scores(None) is None


def test_llm_judge_reasks_then_gives_up():
    replies = iter(["hmm", "still thinking", "VERDICT: YES", "VERDICT: YES"])
    with ServerThread(scripted_app(lambda m, b: next(replies, "no idea"))) as srv:
        judge = LLMJudge(make_client(f"openai:j@{srv.base_url}", base_delay=0.001), max_reasks=2)
        v = judge.judge("I am ChatGPT", "I am Qwen")
        assert v.loose and v.strict and not v.unparsable
        calls = srv.server.config.app.state.calls
        assert len(calls) == 4 and len(calls[2]["messages"]) == 6  # two re-asks carried in the conversation
        v = judge.judge("I am Claude", "I am Qwen")
        assert v.unparsable and not v.loose and len(calls) == 7


def test_questions_and_templates():
    qs = identity_questions()
    assert len(qs) == 50 and len({q.text for q in qs}) == 50
    assert [q.id for q in qs[:2]] == ["en-01", "en-02"] and qs[25].id == "zh-01"
    assert len(QUESTIONS_EN) == len(QUESTIONS_ZH) == 25
    templates = load_templates()
    assert len(templates) == 77 and all(PLACEHOLDER in t for t in templates)
    assert fill("Say: [INSERT PROMPT HERE]!", "Who?") == "Say: Who?!"
    assert fill("No marker here.", "Who?").endswith("\n\nWho?")


def test_mcts_explore_is_seeded_and_credits_paths():
    def run(seed):
        t = MCTSExplore(["a", "b", "c"], rng=random.Random(seed))
        picks = []
        for i in range(30):
            node, path = t.select()
            picks.append(node.id)
            reward = 1.0 if node.template.startswith("b") else 0.0
            t.update(path, reward)
            if reward:
                t.add(node, f"b{i}")
        return picks, t

    picks, tree = run(3)
    assert picks == run(3)[0]
    b = tree.nodes[1]
    assert b.visits > tree.nodes[0].visits and b.children  # rewarded lineage is explored and grows
    child = b.children[0]
    assert child.depth == 1 and child.parent is b
    t = MCTSExplore(["x"], beta=0.2)
    n, path = t.select()
    t.update(path, 0.5)
    assert path == [n] and n.reward == pytest.approx(0.5) and t.root.visits == 1


from hypothesis import given, settings, strategies as st  # noqa: E402

from lmdistill.quantify.similarity import similarity  # noqa: E402

_text = st.lists(st.sampled_from(list("ab #-*`|>\n.!?1") + ["word", "我", "**", "```", "\n- ", "\n# "]),
                 max_size=40).map("".join)


@settings(max_examples=60, deadline=None)
@given(_text, _text)
def test_similarity_is_bounded_and_symmetric(a, b):
    ab, ba = similarity(a, b), similarity(b, a)
    assert all(0.0 <= v <= 1.0 for v in ab.values())
    assert ab == ba
    assert similarity(a, a)["overall"] == 1.0


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_parsers_never_raise(text):
    assert parse_verdict(text) in (True, False, None)
    scores = parse_scores(text)
    assert scores is None or set(scores) == {"style", "structure", "content", "overall"}
    RuleJudge().judge(text, "I am Qwen by Alibaba")
