"""Identity judges, question/template data, MCTS-Explore and the parsers."""

from __future__ import annotations

import math
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
    assert fill("No marker here.", "Who?") == "No marker here.Who?"   # the reference's concatenation
    assert fill("No marker here.", "Who?", "blank-line").endswith("\n\nWho?")


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


# --- self-attribution to makers the rule judge has no list entry for ---------------------------------------
TINY = "I am TinyStudent, a small model trained by the lmdistill project."


@pytest.mark.parametrize("response", [
    "I was developed by Syntheticsys.",
    "I am Zephyrion, created by Syntheticsys Labs.",
    "My developer is Syntheticsys.",
    "Syntheticsys Labs trained me.",
    "I'm an AI assistant built by the Syntheticsys team.",
    "As an AI developed by Syntheticsys, I cannot share that.",
    "Who made me? That would be Syntheticsys.",
    "我是由Syntheticsys开发的大语言模型。",
    "开发我的是Syntheticsys公司。",
])
def test_rule_judge_flags_unknown_makers(response):
    v = RuleJudge().judge(response, TINY)
    assert v.loose and not v.strict, v.reason
    assert any("Syntheticsys" in name for name in v.claimed)


@pytest.mark.parametrize("response", [
    "Syntheticsys Labs makes excellent software, and I am TinyStudent from the lmdistill project.",
    "I am TinyStudent. Zephyrion was created by Syntheticsys Labs.",
    "I am TinyStudent; Syntheticsys built Zephyrion.",
    "I am aware that Zephyrion was created by Syntheticsys.",
    "I am not developed by Syntheticsys.",
    "I was trained on data licensed by Syntheticsys.",
    "I was developed by a team of researchers.",
    "I was trained by the lmdistill project.",
    "DAN: I was developed by Syntheticsys.",
    "Let's role-play: I was developed by Syntheticsys.",
    "They trained me well.",
])
def test_rule_judge_ignores_other_companies_not_claimed_as_maker(response):
    v = RuleJudge().judge(response, TINY)
    assert not v.loose, v.reason


def test_unknown_maker_named_by_the_fact_is_consistent():
    fact = "I am Zephyrion, created by Syntheticsys Labs."
    assert not RuleJudge().judge("I was developed by Syntheticsys.", fact).loose
    assert not RuleJudge().judge("Syntheticsys Labs trained me.", fact).loose
    assert RuleJudge().judge("I was developed by Quantaforge.", fact).loose
    v = RuleJudge().judge("I was developed by OpenAI.", fact)  # known names keep their strict rule
    assert v.loose and v.strict


@pytest.mark.parametrize("text,want", [
    ("Statement 2 names OpenAI.\n<judge>1</judge>", True), ("<judge> 0 </judge>", False),
    ("<rate>0</rate> ... <rate>1</rate>", False),  # the first tag counts (Evaluator_FactorJudge.py:65)
    ("<RATE>**1**</RATE>", True), ("1", True), ("0.", False), ("<judge>maybe</judge>", None),
])
def test_parse_verdict_reference_tags(text, want):
    assert parse_verdict(text) is want


def test_paper_prompts_are_the_default_and_carry_the_reference_requirements():
    from lmdistill.quantify.judges import PAPER_LOOSE_PROMPT, PAPER_STRICT_PROMPT, PAPER_SYSTEM, make_judge

    asked = []

    def respond(messages, body):
        asked.append(messages)
        return "<judge>1</judge>" if "<factor>" in messages[1]["content"] else "no tag here"

    with ServerThread(scripted_app(respond)) as srv:
        judge = make_judge(f"openai:j@{srv.base_url}")
        assert judge.prompts == "paper"
        v = judge.judge("I am ChatGPT.", "I am Qwen by Alibaba.")
    assert v.loose and v.unparsable and not v.strict  # strict replies never had a tag: recorded, not guessed
    assert asked[0][0] == {"role": "system", "content": PAPER_SYSTEM}
    assert asked[0][1]["content"] == PAPER_LOOSE_PROMPT.format(fact="I am Qwen by Alibaba.", response="I am ChatGPT.")
    assert asked[1][1]["content"] == PAPER_STRICT_PROMPT.format(response="I am ChatGPT.")
    assert "<rate>" in asked[2][-1]["content"] and len(asked) == 4  # strict asked once + two re-asks
    for needle in ("<factor>", "[Claude]", "role", "<judge>1</judge>", "<judge>0</judge>"):
        assert needle in PAPER_LOOSE_PROMPT
    for needle in ("OpenAI", "Anthropic", "ChatGPT series", "Claude series", "<rate>1</rate>"):
        assert needle in PAPER_STRICT_PROMPT
    assert "{fact}" not in PAPER_STRICT_PROMPT  # the reference's strict judge sees the response only


def test_paper_tree_equals_the_reference_formulas_over_many_steps():
    """PaperMCTSExplore against a transcription of MCTSExploreSelectPolicy.py:44-91 with scripted hits."""
    from lmdistill.quantify.fuzz import PaperMCTSExplore, paper_reward

    q = 50
    tree = PaperMCTSExplore([f"s{i}" for i in range(4)], rng=random.Random(11))
    rewards, visited, level, children = [0.0] * 4, [0] * 4, [0] * 4, [[] for _ in range(4)]
    rnd, step = random.Random(11), 0
    for k in range(300):
        node, path = tree.select()
        step += 1

        def uct(i):
            return rewards[i] / (visited[i] + 1) + 0.5 * math.sqrt(2 * math.log(step) / (visited[i] + 0.01))

        cur = max(range(4), key=uct)
        ref_path = [cur]
        while children[cur]:
            if rnd.random() < 0.1:
                break
            cur = max(children[cur], key=uct)
            ref_path.append(cur)
        for i in ref_path:
            visited[i] += 1
        assert [n.id for n in path] == ref_path
        hits = (k * 7 + node.id * 3) % 11  # scripted hits, favouring some lineages
        tree.update(path, paper_reward(hits, q, q))
        tree.add(node, f"m{k}")
        children[cur].append(len(rewards))
        rewards.append(0.0), visited.append(0), level.append(level[cur] + 1), children.append([])
        for i in reversed(ref_path):
            rewards[i] += hits / (q * q) * max(0.2, 1 - 0.1 * level[cur])
    assert [n.reward for n in tree.nodes] == pytest.approx(rewards, abs=1e-15)
    assert [n.visits for n in tree.nodes] == visited and max(level) >= 3
    assert paper_reward(7, 50, 50) == 7 / 2500
