"""Identity judges for ICE: the LLM judge (our own prompts) and agreement with the labelled set.

``LLMJudge(client).judge(response, fact)`` asks the loose question; only when the answer is yes it asks
the strict question. A reply without a readable verdict is re-asked (the bad reply and a reminder are
added to the conversation, so the re-ask is a new, separately cached request) up to ``max_reasks`` times;
after that (or when the judge rejects the request, e.g. too long) the verdict is recorded as unparsable
and counted as no hit.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from lmdistill.clients import RequestRejected, make_client
from lmdistill.errors import ConfigError
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

_VERDICT_RE = re.compile(r"verdict\s*[:：]?\s*\**\s*\[{0,2}\s*(yes|no)\b", re.IGNORECASE)
_BRACKET_RE = re.compile(r"\[\[\s*(yes|no)\s*\]\]", re.IGNORECASE)
_BARE_RE = re.compile(r"^\W*(yes|no)\W*$", re.IGNORECASE)


def parse_verdict(text: str | None) -> bool | None:
    """``True``/``False`` from a judge reply, or ``None`` when it has no readable verdict."""
    if not text:
        return None
    for pattern in (_VERDICT_RE, _BRACKET_RE):
        hits = pattern.findall(text)
        if hits:
            return hits[-1].lower() == "yes"
    m = _BARE_RE.match(text.strip())
    return m.group(1).lower() == "yes" if m else None


class LLMJudge:
    """Loose and strict judging by a chat model (``ChatClient``), temperature 0."""

    def __init__(self, client, *, max_reasks: int = 2, max_tokens: int = 256):
        self.client = client
        self.name = client.name
        self.max_reasks = max_reasks
        self.max_tokens = max_tokens

    def ask(self, prompt: str) -> bool | None:
        messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]
        for _ in range(self.max_reasks + 1):
            try:
                reply = self.client.chat(messages, temperature=0.0, max_tokens=self.max_tokens)
            except RequestRejected:  # e.g. the answer is too long for the judge: no verdict, not a crash
                return None
            verdict = parse_verdict(reply)
            if verdict is not None:
                return verdict
            messages = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": REASK}]
        return None

    def judge(self, response: str, fact: str) -> Verdict:
        loose = self.ask(LOOSE_PROMPT.format(fact=fact, response=response))
        if loose is None:
            return Verdict(False, False, reason="judge reply unparsable (loose)", unparsable=True)
        if not loose:
            return Verdict(False, False, reason="judge: no conflict")
        strict = self.ask(STRICT_PROMPT.format(fact=fact, response=response))
        if strict is None:
            return Verdict(True, False, reason="judge reply unparsable (strict)", unparsable=True)
        return Verdict(True, strict, reason="judge: conflict" + (", OpenAI/Anthropic" if strict else ""))


def make_judge(spec: str | None, *, cache=None, **client_kwargs):
    """``rule`` (or None) -> ``RuleJudge``; a model spec -> ``LLMJudge`` over a (cached) client."""
    if spec in (None, "", "rule"):
        return RuleJudge()
    return LLMJudge(make_client(spec, cache=cache, **client_kwargs))


def labelled_examples(path: str | Path | None = None) -> list[dict]:
    """The shipped labelled identity answers (or ``path``): response, fact, loose, strict, lang, split."""
    if path is None:
        text = resources.files("lmdistill.quantify").joinpath("data/identity_judge_labelled.jsonl").read_text("utf-8")
        source = "identity_judge_labelled.jsonl"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read labelled examples ({e.strerror})") from None
        source = str(path)
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ConfigError(f"{source}:{i}: not valid JSON") from None
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
    rows = []
    for ex in examples:
        v = judge.judge(ex["response"], ex["fact"])
        rows.append({"id": ex.get("id"), "split": ex.get("split", "all"), "lang": ex.get("lang"),
                     "loose": (v.loose, bool(ex["loose"])), "strict": (v.strict, bool(ex["strict"])),
                     "unparsable": v.unparsable, "reason": v.reason})

    def summary(subset):
        return {"loose": _binary_stats([r["loose"] for r in subset]),
                "strict": _binary_stats([r["strict"] for r in subset]),
                "both_correct": round(sum(r["loose"][0] == r["loose"][1] and r["strict"][0] == r["strict"][1]
                                          for r in subset) / len(subset), 4) if subset else None}

    out = {"judge": getattr(judge, "name", "rule"), "overall": summary(rows)}
    for key in ("split", "lang"):
        for value in sorted({r[key] for r in rows if r[key]}):
            out[f"{key}={value}"] = summary([r for r in rows if r[key] == value])
    out["disagreements"] = [{"id": r["id"], "predicted": {"loose": r["loose"][0], "strict": r["strict"][0]},
                             "label": {"loose": r["loose"][1], "strict": r["strict"][1]}, "reason": r["reason"]}
                            for r in rows if r["loose"][0] != r["loose"][1] or r["strict"][0] != r["strict"][1]]
    return out
