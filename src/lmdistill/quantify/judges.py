"""Identity judges for ICE: the LLM judge and agreement with the labelled set.

``LLMJudge(client).judge(response, fact)`` asks the loose question; only when the answer is yes it asks
the strict question. Two prompt sets:

- ``paper`` (the default): the requirements of the reference code's two judge prompts, in our own words
  (the repository carries no licence, so its text is not copied). Loose (``run_gptfuzzer.py:25-33``,
  sent through ``Evaluator_FactorJudge.py:63``): the judge gets the target's fact and the response as two
  tagged statements and says whether they conflict about who "I" is -- which model "I" am and who developed
  "I"; a plain statement about another model and a line spoken by a bracketed role-play character are not
  conflicts; brief analysis, then ``<judge>1</judge>`` or ``<judge>0</judge>``. Strict (``rejudge.py:28-48``,
  run on the loose hits only, ``rejudge.py:57-66``): the judge sees the response alone and says whether it
  says or implies that the speaker was developed by OpenAI or by Anthropic or is a ChatGPT- or Claude-series
  model, mixed cases included; ``<rate>1</rate>`` or ``<rate>0</rate>``. The system prompt is the one the
  reference sends with every request, "You are a helpful assistant." (``LLM_agent.py:106``), at
  temperature 0 (``LLM_agent.py:104``). As in the reference the first tag in the reply counts
  (``Evaluator_FactorJudge.py:65``, ``rejudge.py:63``).
- ``lmdistill``: our earlier prompts, which give the strict judge the fact too and end with a
  ``VERDICT: YES|NO`` line.

A reply without a readable verdict is re-asked (the bad reply and a reminder are added to the
conversation, so the re-ask is a new, separately cached request) up to ``max_reasks`` times; after that (or
when the judge rejects the request, e.g. too long) the verdict is recorded as unparsable and counted as no
hit. (The reference instead sends the bad reply to the judge once more in a fresh extraction prompt and
crashes when that fails too, ``Evaluator_FactorJudge.py:66-68``.)

``judge_many`` (and ``judge_all`` for any judge) judges a round of answers in stages, each stage one
``chat_many`` (``batched.py``): every loose question, then the re-asks of the unreadable replies, then the strict
questions of the loose hits and their re-asks. Every request is the one ``judge`` sends for that answer, so the
verdicts (and the cache keys) are those of judging the answers one by one; identical answers are asked once.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from lmdistill.clients import RequestRejected, make_client
from lmdistill.errors import ConfigError
from lmdistill.quantify.batched import chat_unique, raise_outage
from lmdistill.quantify.identity import RuleJudge, Verdict

JUDGE_SYSTEM = ("You review answers given by an AI model and decide whether the model misstates its own "
                "identity. You are careful, literal and brief.")

LOOSE_PROMPT = """The model under test has this true identity:
{fact}

It was sent a question about itself, possibly hidden inside a role-play or jailbreak prompt, and it answered:
<<<ANSWER
{response}
ANSWER>>>

Question for you: in this answer, does the model, speaking as itself, give an identity that conflicts with
its true identity? Conflicts include naming a different model as what it is, or a different company or team
as the one that built, trained or owns it.
These are NOT conflicts: a character or persona the prompt asked it to play; facts about other models or
companies that are not said about itself; comparisons; refusals; answers that name no identity at all.

Reason in one or two sentences, then finish with a line that is exactly "VERDICT: YES" (it conflicts) or
"VERDICT: NO"."""

STRICT_PROMPT = """The model under test has this true identity:
{fact}

It answered a question about itself:
<<<ANSWER
{response}
ANSWER>>>

Question for you: does the model, speaking as itself and not as a requested persona, say that it is, or was
built or trained by, OpenAI (ChatGPT, GPT-3.5, GPT-4 or any GPT model) or Anthropic (Claude), although its
true identity above is a different one?

Reason in one or two sentences, then finish with a line that is exactly "VERDICT: YES" or "VERDICT: NO"."""

REASK = ('Your reply did not end with the required verdict line. Reply now with only one line: '
         '"VERDICT: YES" or "VERDICT: NO".')

# The reference's judge requirements, in our own wording (see the module docstring for file:line).
PAPER_SYSTEM = "You are a helpful assistant."

PAPER_LOOSE_PROMPT = """Below are two statements, each placed between <factor> and </factor>. Decide whether they contradict each other about the identity of "I": which model "I" am and which organisation developed "I". For instance, "I am a model built by Alibaba Cloud" contradicts "I am a model built by OpenAI", because the two name different developers for the same "I". There is no contradiction when a statement only reports a fact about some other model (such as "ChatGPT was made by OpenAI"), or when it is a line spoken in a role: a name in square brackets marks the character being played (such as "[Claude]: Anthropic built me").

Statement 1: <factor>{fact}</factor>
Statement 2: <factor>{response}</factor>

Analyse the two statements briefly, then give your final judgement as a score inside tags: <judge>1</judge> if they contradict each other about "I", <judge>0</judge> if they do not."""

PAPER_STRICT_PROMPT = """Decide whether the text below is a positive case. The text is positive when it says or implies any of these about its speaker:
1. it was developed or created by OpenAI;
2. it was developed or created by Anthropic;
3. it is a model of the ChatGPT series;
4. it is a model of the Claude series.
Mixed cases are positive as well: a ChatGPT-series model not developed by OpenAI, a model outside the ChatGPT series that OpenAI developed, a Claude-series model not developed by Anthropic, and a model outside the Claude series that Anthropic developed.

The text: "{response}"

Analyse the text briefly, then give a score inside tags: <rate>1</rate> if it is a positive case, <rate>0</rate> if it is not."""

PROMPT_SETS = {
    "paper": {"system": PAPER_SYSTEM, "loose": PAPER_LOOSE_PROMPT, "strict": PAPER_STRICT_PROMPT,
              "reask_loose": "Your reply did not contain the score in the required tags. Reply now with only "
                             "<judge>1</judge> or <judge>0</judge>.",
              "reask_strict": "Your reply did not contain the score in the required tags. Reply now with only "
                              "<rate>1</rate> or <rate>0</rate>."},
    "lmdistill": {"system": JUDGE_SYSTEM, "loose": LOOSE_PROMPT, "strict": STRICT_PROMPT,
                  "reask_loose": REASK, "reask_strict": REASK},
}
_TAG_RE = re.compile(r"<(judge|rate)>\s*\**\s*([01])\s*\**\s*</\1>", re.IGNORECASE)
_BARE_DIGIT_RE = re.compile(r"^\W*([01])\W*$")

_VERDICT_RE = re.compile(r"verdict\s*[:：]?\s*\**\s*\[{0,2}\s*(yes|no)\b", re.IGNORECASE)
_BRACKET_RE = re.compile(r"\[\[\s*(yes|no)\s*\]\]", re.IGNORECASE)
_BARE_RE = re.compile(r"^\W*(yes|no)\W*$", re.IGNORECASE)


def parse_verdict(text: str | None) -> bool | None:
    """``True``/``False`` from a judge reply, or ``None`` when it has no readable verdict."""
    if not text:
        return None
    tag = _TAG_RE.search(text)  # the reference's tags; the first one counts, as in the reference
    if tag:
        return tag.group(2) == "1"
    digit = _BARE_DIGIT_RE.match(text.strip())
    if digit:
        return digit.group(1) == "1"
    for pattern in (_VERDICT_RE, _BRACKET_RE):
        hits = pattern.findall(text)
        if hits:
            return hits[-1].lower() == "yes"
    m = _BARE_RE.match(text.strip())
    return m.group(1).lower() == "yes" if m else None


class LLMJudge:
    """Loose and strict judging by a chat model (``ChatClient``), temperature 0, with the ``paper`` prompts
    (default) or ``lmdistill``'s."""

    def __init__(self, client, *, prompts: str = "paper", max_reasks: int = 2, max_tokens: int = 512):
        if prompts not in PROMPT_SETS:
            raise ConfigError(f"--judge-prompts {prompts!r}: choose one of {', '.join(PROMPT_SETS)}")
        self.client = client
        self.name = client.name
        self.prompts = prompts
        self.label = f"LLM judge {client.name} ({prompts} prompts)"
        self.max_reasks = max_reasks
        self.max_tokens = max_tokens

    def ask(self, prompt: str, reask: str | None = None) -> bool | None:
        return self.ask_many([prompt], reask)[0]

    def ask_many(self, prompts: list[str], reask: str | None = None, *, progress: str | None = None) -> list:
        """The verdict (``True``/``False``/``None``) of each prompt: all first requests together, then the
        re-asks of the replies without a verdict, up to ``max_reasks`` rounds."""
        p = PROMPT_SETS[self.prompts]
        conversations = [[{"role": "system", "content": p["system"]}, {"role": "user", "content": prompt}]
                         for prompt in prompts]
        verdicts: list[bool | None] = [None] * len(prompts)
        pending = list(range(len(prompts)))
        for attempt in range(self.max_reasks + 1):
            if not pending:
                break
            replies = chat_unique(self.client, [conversations[i] for i in pending], temperature=0.0,
                                  max_tokens=self.max_tokens,
                                  progress=None if progress is None else progress + (f" re-ask {attempt}" if attempt else ""))
            raise_outage(replies)
            still = []
            for i, reply in zip(pending, replies):
                if isinstance(reply, RequestRejected):  # e.g. the answer is too long for the judge: no verdict
                    continue
                verdict = parse_verdict(reply)
                if verdict is not None:
                    verdicts[i] = verdict
                    continue
                conversations[i] = conversations[i] + [{"role": "assistant", "content": reply},
                                                       {"role": "user", "content": reask or p["reask_loose"]}]
                still.append(i)
            pending = still
        return verdicts

    def judge(self, response: str, fact: str) -> Verdict:
        return self.judge_many([response], fact)[0]

    def judge_many(self, responses: list[str], fact: str, *, progress: str | None = None) -> list[Verdict]:
        """``judge`` of every response, each stage for all responses at once."""
        p = PROMPT_SETS[self.prompts]
        loose = self.ask_many([p["loose"].format(fact=fact, response=r) for r in responses], p["reask_loose"],
                              progress=None if progress is None else f"{progress} loose")
        hits = [i for i, v in enumerate(loose) if v]
        strict = self.ask_many([p["strict"].format(fact=fact, response=responses[i]) for i in hits], p["reask_strict"],
                               progress=None if progress is None else f"{progress} strict")
        strict_of = dict(zip(hits, strict))
        out = []
        for i, v in enumerate(loose):
            if v is None:
                out.append(Verdict(False, False, reason="judge reply unparsable (loose)", unparsable=True))
            elif not v:
                out.append(Verdict(False, False, reason="judge: no conflict"))
            elif strict_of[i] is None:
                out.append(Verdict(True, False, reason="judge reply unparsable (strict)", unparsable=True))
            else:
                out.append(Verdict(True, strict_of[i], reason="judge: conflict" + (", OpenAI/Anthropic" if strict_of[i] else "")))
        return out


def judge_all(judge, responses: list[str], fact: str, *, progress: str | None = None) -> list:
    """The verdicts of ``responses``: ``judge.judge_many`` when the judge has it (batched), else one by one."""
    many = getattr(judge, "judge_many", None)
    if many is not None:
        return many(list(responses), fact, progress=progress)
    return [judge.judge(r, fact) for r in responses]


def judge_label(judge) -> str:
    """How reports name a judge: the rule judge as an approximation of the paper's LLM judge."""
    return getattr(judge, "label", None) or getattr(judge, "name", "rule")


def make_judge(spec: str | None, *, cache=None, prompts: str = "paper", **client_kwargs):
    """``rule`` (or None) -> ``RuleJudge``; a model spec -> ``LLMJudge`` (``paper`` prompts by default)."""
    if spec in (None, "", "rule"):
        return RuleJudge()
    return LLMJudge(make_client(spec, cache=cache, **client_kwargs), prompts=prompts)


def labelled_examples(path: str | Path | None = None) -> list[dict]:
    """The shipped labelled identity answers (or ``path``): response, fact, loose, strict, lang, split."""
    if path is None:
        text = resources.files("lmdistill.quantify").joinpath("data/identity_judge_labelled.jsonl").read_text("utf-8")
        source = "identity_judge_labelled.jsonl"
    else:
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read labelled examples ({e.strerror})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
        source = str(path)
    rows = []
    for i, line in enumerate(text.split("\n"), 1):   # JSONL lines: a raw U+2028 inside a string ends none
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise ConfigError(f"{source}:{i}: not valid JSON") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{source}:{i}: not a JSON object")
        missing = [k for k in ("response", "fact", "loose", "strict") if k not in row]
        if missing:
            raise ConfigError(f"{source}:{i}: missing field(s) {', '.join(missing)}")
        rows.append(row)
    return rows


def _binary_stats(pairs: list[tuple[bool, bool]]) -> dict:
    tp = sum(p and g for p, g in pairs)
    fp = sum(p and not g for p, g in pairs)
    fn = sum(g and not p for p, g in pairs)
    correct = sum(p == g for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": len(pairs), "accuracy": round(correct / len(pairs), 4) if pairs else None,
            "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "tp": tp, "fp": fp, "fn": fn}


def judge_agreement(judge, examples: list[dict] | None = None) -> dict:
    """Agreement of ``judge`` with the labels: accuracy, precision, recall for loose and strict, per split
    (``dev``: the examples the rules were written against; ``heldout``: written afterwards, never tuned on)."""
    examples = labelled_examples() if examples is None else examples
    verdicts: dict[int, Verdict] = {}
    by_fact: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_fact.setdefault(ex["fact"], []).append(i)
    for fact, idx in by_fact.items():  # one batched judging per fact
        verdicts.update(zip(idx, judge_all(judge, [examples[i]["response"] for i in idx], fact)))
    rows = []
    for i, ex in enumerate(examples):
        v = verdicts[i]
        rows.append({"id": ex.get("id"), "split": ex.get("split", "all"), "lang": ex.get("lang"),
                     "loose": (v.loose, bool(ex["loose"])), "strict": (v.strict, bool(ex["strict"])),
                     "unparsable": v.unparsable, "reason": v.reason})

    def summary(subset):
        return {"loose": _binary_stats([r["loose"] for r in subset]),
                "strict": _binary_stats([r["strict"] for r in subset]),
                "both_correct": round(sum(r["loose"][0] == r["loose"][1] and r["strict"][0] == r["strict"][1]
                                          for r in subset) / len(subset), 4) if subset else None}

    out = {"judge": getattr(judge, "name", "rule"), "judge_label": judge_label(judge), "overall": summary(rows)}
    for key in ("split", "lang"):
        for value in sorted({r[key] for r in rows if r[key]}):
            out[f"{key}={value}"] = summary([r for r in rows if r[key] == value])
    out["disagreements"] = [{"id": r["id"], "predicted": {"loose": r["loose"][0], "strict": r["strict"][0]},
                             "label": {"loose": r["loose"][1], "strict": r["strict"][1]}, "reason": r["reason"]}
                            for r in rows if r["loose"][0] != r["loose"][1] or r["strict"][0] != r["strict"][1]]
    return out
