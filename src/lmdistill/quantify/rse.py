"""RSE, response similarity evaluation (arXiv 2501.12619).

The target and a reference model answer the same prompts (cached). An LLM judge, when given, scores how
similar the target's answer is to the reference's, each 1-5, on the paper's three aspects -- response
style, logical structure, content detail -- and overall (the reference README names the three aspects
and says the evaluation produces an overall similarity score, ``README.md:71``; its RSE scripts and
scoring prompt are not in the repository, ``README.md:147-157`` points at a ``response_similarity_evaluation/``
folder it does not contain, so the prompt is ours). A reply that lacks a score, or has one outside 1-5, is
re-asked up to ``max_reasks`` times; then the pair is kept with ``judge: null`` and a ``judge_error`` that
says what was wrong (which aspects were missing or out of range, or that the judge rejected the request),
counted in ``judge_scores.unparsable`` and listed in ``judge_scores.errors`` -- never dropped silently.
Judge-free similarity (``similarity.py``, labelled "ours (judge-free)" in reports: it is not the paper's
metric) is always computed, so RSE also runs without any judge. Means per prompt set, then the mean of
the sets.

Batching (``batched.py``): each model's answers to a prompt set go out in one ``chat_many``, and the judge
scores all pairs in rounds (``judge_pairs``): every first request in one ``chat_many``, then the re-asks of the
malformed replies, round by round. The requests are those of judging the pairs one by one (``judge_pair``), so
the scores and the cache keys are the same; a rerun after kill -9 sends only the requests without an answer.
"""

from __future__ import annotations

import json
import re
import statistics
from importlib import resources
from pathlib import Path

from lmdistill.errors import ConfigError
from lmdistill.io import iter_jsonl_rows
from lmdistill.clients import ClientError, RequestRejected
from lmdistill.quantify.batched import chat_unique, raise_outage
from lmdistill.quantify.report import ASPECTS, JUDGE_FREE_LABEL, rse_chart, rse_markdown, write_summary
from lmdistill.quantify.similarity import similarity

RSE_SYSTEM = "You compare two answers to the same request and rate how alike they are. You are strict and consistent."

RSE_PROMPT = """A user sent this request:
<<<REQUEST
{prompt}
REQUEST>>>

Answer A:
<<<A
{reference}
A>>>

Answer B:
<<<B
{response}
B>>>

Rate how similar answer B is to answer A -- not which one is better -- on four aspects, each from 1 (nothing
alike) to 5 (practically the same):
- response style: tone, wording habits, length, use of formatting such as bold text or emoji;
- logical structure: how the reasoning is organised: order of steps, sections, lists, headings, code blocks;
- content detail: the facts, ideas, examples and details that are included or left out;
- overall: your overall judgement of how similar the two answers are.

Give at most two sentences of reasoning, then end with exactly these four lines:
response style: <1-5>
logical structure: <1-5>
content detail: <1-5>
overall: <1-5>"""

REASK = ("Your reply did not contain all four scores ({problem}). Reply with only these four lines, each with "
         "a number from 1 to 5:\nresponse style: N\nlogical structure: N\ncontent detail: N\noverall: N")

_SCORE_RE = {a: re.compile(rf"(?im)^[\s*#>-]*(?:response\s+|logical\s+)?{a}(?:\s+detail)?\**\s*[:：=]\s*\**\s*([1-5](?:\.\d+)?)\b")
             for a in ASPECTS}


_ANY_VALUE_RE = {a: re.compile(rf"(?im)^[\s*#>-]*(?:response\s+|logical\s+)?{a}(?:\s+detail)?\**\s*[:：=]\s*\**\s*"
                               r"(-?\d+(?:\.\d+)?)") for a in ASPECTS}


def parse_scores_detail(text: str | None) -> tuple[dict[str, float] | None, str | None]:
    """``(scores, None)`` from a judge reply (``key: N`` lines or a JSON object), or ``(None, problem)``
    naming what is wrong: an empty reply, or the aspects that are missing or outside 1-5."""
    if not text or not text.strip():
        return None, "empty reply"
    m = re.search(r"\{[^{}]*\}", text)
    if m:
        try:
            obj = {str(k).lower(): v for k, v in json.loads(m.group(0)).items()}
            vals = {a: float(obj[a]) for a in ASPECTS}
            if all(1 <= v <= 5 for v in vals.values()):
                return vals, None
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    out, missing, bad = {}, [], []
    for a, pattern in _SCORE_RE.items():
        hits = pattern.findall(text)
        if not hits:
            other = _ANY_VALUE_RE[a].findall(text)
            (bad if other else missing).append(f"{a}={other[-1]}" if other else a)
            continue
        value = float(hits[-1])
        if not 1 <= value <= 5:
            bad.append(f"{a}={hits[-1]}")
            continue
        out[a] = value
    if missing or bad:
        parts = ([f"no score for {', '.join(missing)}"] if missing else []) + \
                ([f"out of range 1-5: {', '.join(bad)}"] if bad else [])
        return None, "; ".join(parts)
    return out, None


def parse_scores(text: str | None) -> dict[str, float] | None:
    """The four 1-5 scores from a judge reply, or None (``parse_scores_detail`` says why)."""
    return parse_scores_detail(text)[0]


def judge_pair(judge, prompt: str, reference: str, response: str, *, max_reasks: int = 2,
               max_tokens: int = 256) -> tuple[dict | None, int, str | None]:
    """``(scores, judge requests, error)``: scores or None, with the reason when None."""
    return judge_pairs(judge, [(prompt, reference, response)], max_reasks=max_reasks, max_tokens=max_tokens)[0]


def judge_pairs(judge, pairs: list[tuple[str, str, str]], *, max_reasks: int = 2, max_tokens: int = 256,
                progress: str | None = None) -> list[tuple[dict | None, int, str | None]]:
    """``judge_pair`` of every ``(prompt, reference, response)``, one batched request round per attempt."""
    conversations = [[{"role": "system", "content": RSE_SYSTEM},
                      {"role": "user", "content": RSE_PROMPT.format(prompt=p, reference=ref, response=resp)}]
                     for p, ref, resp in pairs]
    results: list = [None] * len(pairs)
    recorded: list = [None] * len(pairs)
    pending = list(range(len(pairs)))
    for attempt in range(max_reasks + 1):
        if not pending:
            break
        replies = chat_unique(judge, [conversations[i] for i in pending], temperature=0.0, max_tokens=max_tokens,
                              progress=None if progress is None else progress + (f" re-ask {attempt}" if attempt else ""))
        raise_outage(replies)
        still = []
        for i, reply in zip(pending, replies):
            if isinstance(reply, RequestRejected):  # e.g. the pair is too long for the judge: recorded, not a crash
                results[i] = (None, attempt + 1, f"judge rejected the request: {reply}")
                continue
            scores, problem = parse_scores_detail(reply)
            if scores is not None:
                results[i] = (scores, attempt + 1, None)
                continue
            last = (reply or "").strip().replace("\n", " ")
            recorded[i] = f"{problem} (last reply: {last[:120]!r})"
            conversations[i] = conversations[i] + [{"role": "assistant", "content": reply or ""},
                                                   {"role": "user", "content": REASK.format(problem=problem)}]
            still.append(i)
        pending = still
    for i in pending:
        results[i] = (None, max_reasks + 1, f"malformed judge reply after {max_reasks + 1} request(s): {recorded[i]}")
    return results


def _prompt_of(row: dict) -> str | None:
    for key in ("prompt", "instruction", "question"):
        if isinstance(row.get(key), str) and row[key].strip():
            extra = row.get("input") if key == "instruction" else None
            return f"{row[key]}\n\n{extra}" if isinstance(extra, str) and extra.strip() else row[key]
    turns = row.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str):
        return turns[0]
    return None


def load_prompt_set(spec: str, limit: int | None = None) -> tuple[str, list[dict]]:
    """``arena-hard`` (the bundled 500) or a JSONL file with ``prompt``/``instruction``/``question``/``turns``,
    or a text file with one prompt per line. Returns ``(set name, [{"id", "prompt"}])``."""
    if spec == "arena-hard":
        text = resources.files("lmdistill.quantify").joinpath("data/arena_hard_question.jsonl").read_text("utf-8")
        rows = [json.loads(l) for l in text.splitlines() if l.strip()]
        items = [{"id": r["uid"], "prompt": r["prompt"]} for r in rows]
        name = "arena-hard"
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"--prompts {spec}: not 'arena-hard' and no such file")
        name = path.stem
        items = []
        if path.suffix in (".jsonl", ".json"):
            for i, row, problem in iter_jsonl_rows(path):
                if problem is not None:
                    raise ConfigError(str(problem))
                prompt = _prompt_of(row) if isinstance(row, dict) else None
                if prompt is None:
                    raise ConfigError(f"{path}:{i}: no prompt (expected a 'prompt', 'instruction', 'question' or "
                                      "'turns' field)")
                items.append({"id": str(row.get("id", row.get("uid", row.get("question_id", i)))), "prompt": prompt})
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            items = [{"id": str(i), "prompt": l} for i, l in enumerate(lines, 1) if l.strip()]
        if not items:
            raise ConfigError(f"{path}: no prompts")
    return name, items[:limit] if limit else items


def _mean(rows: list[dict], key: str, aspects) -> dict:
    out = {}
    for a in aspects:
        vals = [r[key][a] for r in rows if r.get(key) and r[key].get(a) is not None]
        out[a] = round(statistics.fmean(vals), 4) if vals else None
    out["n"] = sum(bool(r.get(key)) for r in rows)
    return out


def _mean_of_sets(per_set: dict, aspects) -> dict:
    out = {}
    for a in aspects:
        vals = [s[a] for s in per_set.values() if s.get(a) is not None]
        out[a] = round(statistics.fmean(vals), 4) if vals else None
    return out


def run_rse(target, reference, prompt_sets: dict[str, list[dict]], *, judge=None, embedder=None,
            max_tokens: int = 512, judge_max_tokens: int = 256, max_reasks: int = 2, progress: bool = True) -> dict:
    """Responses of both models, judge-free similarity, and LLM-judge scores when ``judge`` is given."""
    from tqdm import tqdm

    rows = []
    for set_name, items in prompt_sets.items():
        batch = [[{"role": "user", "content": it["prompt"]}] for it in items]
        answers = {}
        for role, client in (("reference", reference), ("response", target)):
            got = chat_unique(client, batch, temperature=0.0, max_tokens=max_tokens,
                              progress=f"{set_name}: {role}" if progress else None)
            raise_outage(got)
            answers[role] = got
        for it, ref, resp in zip(items, answers["reference"], answers["response"]):
            error = next((str(x) for x in (ref, resp) if isinstance(x, ClientError)), None)
            rows.append({"set": set_name, "id": it["id"], "prompt": it["prompt"],
                         "reference": ref if isinstance(ref, str) else None,
                         "response": resp if isinstance(resp, str) else None, "error": error})
    scored = [r for r in rows if r["error"] is None]
    for r in tqdm(scored, desc="RSE similarity", disable=not progress, leave=False):
        r["similarity"] = similarity(r["response"], r["reference"], embedder)
    unparsable = 0
    if judge is not None:
        results = judge_pairs(judge, [(r["prompt"], r["reference"], r["response"]) for r in scored],
                              max_reasks=max_reasks, max_tokens=judge_max_tokens,
                              progress="RSE judge" if progress else None)
        for r, (scores, requests, error) in zip(scored, results):
            r["judge"], r["judge_requests"], r["judge_error"] = scores, requests, error
            unparsable += scores is None
    sim_aspects = ASPECTS + (("embedding",) if embedder is not None else ())
    sets = list(prompt_sets)
    similarity_summary = {"per_set": {s: _mean([r for r in scored if r["set"] == s], "similarity", sim_aspects)
                                      for s in sets}}
    similarity_summary["mean_of_sets"] = _mean_of_sets(similarity_summary["per_set"], sim_aspects)
    judge_summary = None
    if judge is not None:
        judge_summary = {"per_set": {s: _mean([r for r in scored if r["set"] == s], "judge", ASPECTS) for s in sets},
                         "unparsable": unparsable,
                         "errors": [{"set": r["set"], "id": r["id"], "error": r["judge_error"]}
                                    for r in scored if r.get("judge_error")]}
        judge_summary["mean_of_sets"] = _mean_of_sets(judge_summary["per_set"], ASPECTS)
    return {"kind": "rse", "target": target.name, "reference": reference.name,
            "judge": judge.name if judge is not None else None,
            "embedder": getattr(embedder, "name", None),
            "config": {"sets": {s: len(v) for s, v in prompt_sets.items()}, "max_tokens": max_tokens,
                       "max_reasks": max_reasks},
            "pairs": len(scored), "errors": len(rows) - len(scored),
            "similarity_label": JUDGE_FREE_LABEL,
            "similarity": similarity_summary, "judge_scores": judge_summary, "items": rows}


def write_rse(result: dict, out_dir: str | Path) -> dict:
    """``rse.json`` (summary), ``rse_items.jsonl`` (every pair with its scores), ``rse.md``, ``rse.png``."""
    return write_summary(result, out_dir, "rse", "items", rse_markdown, rse_chart)
