"""RSE, response similarity evaluation (arXiv 2501.12619).

The target and a reference model answer the same prompts (cached). An LLM judge, when given, scores how
similar the target's answer is to the reference's on response style, logical structure, content detail
and overall, each 1-5, with lmdistill's own prompt; a reply without all four scores is re-asked up to
``max_reasks`` times and then recorded as unparsable. Judge-free similarity (``similarity.py``) is
always computed, so RSE also runs without any judge. Means per prompt set, then the mean of the sets.
"""

from __future__ import annotations

import json
import re
import statistics
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from lmdistill.errors import ConfigError
from lmdistill.io import iter_jsonl_rows
from lmdistill.clients import ClientError, RequestRejected
from lmdistill.quantify.report import ASPECTS, rse_chart, rse_markdown, write_summary
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
- style: tone, wording habits, length, use of formatting such as bold text or emoji;
- structure: how the reasoning is organised: order of steps, sections, lists, headings, code blocks;
- content: the facts, ideas, examples and details that are included or left out;
- overall: your overall judgement of how similar the two answers are.

Give at most two sentences of reasoning, then end with exactly these four lines:
style: <1-5>
structure: <1-5>
content: <1-5>
overall: <1-5>"""

REASK = ("Your reply did not contain all four scores. Reply with only these four lines, each with a number "
         "from 1 to 5:\nstyle: N\nstructure: N\ncontent: N\noverall: N")

_SCORE_RE = {a: re.compile(rf"(?im)^[\s*#>-]*(?:response\s+|logical\s+)?{a}(?:\s+detail)?\**\s*[:：=]\s*\**\s*([1-5](?:\.\d+)?)\b")
             for a in ASPECTS}


def parse_scores(text: str | None) -> dict[str, float] | None:
    """The four 1-5 scores from a judge reply (``key: N`` lines or a JSON object), or None."""
    if not text:
        return None
    m = re.search(r"\{[^{}]*\}", text)
    if m:
        try:
            obj = {str(k).lower(): v for k, v in json.loads(m.group(0)).items()}
            vals = {a: float(obj[a]) for a in ASPECTS}
            if all(1 <= v <= 5 for v in vals.values()):
                return vals
        except (ValueError, KeyError, TypeError):
            pass
    out = {}
    for a, pattern in _SCORE_RE.items():
        hits = pattern.findall(text)
        if not hits:
            return None
        value = float(hits[-1])
        if not 1 <= value <= 5:
            return None
        out[a] = value
    return out


def judge_pair(judge, prompt: str, reference: str, response: str, *, max_reasks: int = 2,
               max_tokens: int = 256) -> tuple[dict | None, int]:
    """Scores (or None when unparsable after the re-asks) and the number of judge requests."""
    messages = [{"role": "system", "content": RSE_SYSTEM},
                {"role": "user", "content": RSE_PROMPT.format(prompt=prompt, reference=reference, response=response)}]
    for attempt in range(max_reasks + 1):
        try:
            reply = judge.chat(messages, temperature=0.0, max_tokens=max_tokens)
        except RequestRejected:  # e.g. the pair is too long for the judge: recorded as unparsable
            return None, attempt + 1
        scores = parse_scores(reply)
        if scores is not None:
            return scores, attempt + 1
        messages = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": REASK}]
    return None, max_reasks + 1


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
            got = client.chat_many(batch, return_exceptions=True, temperature=0.0, max_tokens=max_tokens,
                                   progress=f"{set_name}: {role}" if progress else None)
            for a in got:
                if isinstance(a, ClientError) and not isinstance(a, RequestRejected):
                    raise a
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
        def one(r):
            return judge_pair(judge, r["prompt"], r["reference"], r["response"], max_reasks=max_reasks,
                              max_tokens=judge_max_tokens)

        workers = max(1, getattr(judge, "concurrency", 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(one, scored), total=len(scored), desc="RSE judge", disable=not progress,
                                leave=False))
        for r, (scores, requests) in zip(scored, results):
            r["judge"], r["judge_requests"] = scores, requests
            unparsable += scores is None
    sim_aspects = ASPECTS + (("embedding",) if embedder is not None else ())
    sets = list(prompt_sets)
    similarity_summary = {"per_set": {s: _mean([r for r in scored if r["set"] == s], "similarity", sim_aspects)
                                      for s in sets}}
    similarity_summary["mean_of_sets"] = _mean_of_sets(similarity_summary["per_set"], sim_aspects)
    judge_summary = None
    if judge is not None:
        judge_summary = {"per_set": {s: _mean([r for r in scored if r["set"] == s], "judge", ASPECTS) for s in sets},
                         "unparsable": unparsable}
        judge_summary["mean_of_sets"] = _mean_of_sets(judge_summary["per_set"], ASPECTS)
    return {"kind": "rse", "target": target.name, "reference": reference.name,
            "judge": judge.name if judge is not None else None,
            "embedder": getattr(embedder, "name", None),
            "config": {"sets": {s: len(v) for s, v in prompt_sets.items()}, "max_tokens": max_tokens,
                       "max_reasks": max_reasks},
            "pairs": len(scored), "errors": len(rows) - len(scored),
            "similarity": similarity_summary, "judge_scores": judge_summary, "items": rows}


def write_rse(result: dict, out_dir: str | Path) -> dict:
    """``rse.json`` (summary), ``rse_items.jsonl`` (every pair with its scores), ``rse.md``, ``rse.png``."""
    return write_summary(result, out_dir, "rse", "items", rse_markdown, rse_chart)
