"""ICE, identity consistency evaluation (arXiv 2501.12619), as a resumable run.

Each step selects a template with MCTS-Explore, mutates it with a random mutator run by the helper
model, asks the target every identity question wrapped in the mutant, and judges the answers. The step's
reward is hits / (questions x mutants); a mutant with a hit joins the tree. The budget counts target
queries (1000 = 20 mutants x 50 questions).

Scores over all queries: loose = loose hits / queries, strict = strict hits / queries, hard = strict hits
whose prompt (mutated template plus question) names no model or company outside the declared fact, i.e.
carried no misleading identity information, / queries; each also per language. Many GPTFuzz templates
say "you are ChatGPT", and two questions name ChatGPT: their strict hits never count as hard.

Every model call goes through the response cache, and the search is a deterministic function of the seed
and the (cached) answers, so a rerun after a crash replays the finished steps from the cache without
paying for them and continues; its report equals that of an uninterrupted run.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lmdistill.errors import ConfigError
from lmdistill.clients import ClientError, RequestRejected
from lmdistill.quantify.fuzz import MCTSExplore
from lmdistill.quantify.identity import misleading_names
from lmdistill.quantify.mutators import MUTATORS, mutate
from lmdistill.quantify.questions import identity_questions
from lmdistill.quantify.report import ice_chart, ice_markdown, write_summary
from lmdistill.quantify.templates import fill, load_templates, strip_placeholder


@dataclass
class IceConfig:
    fact: str
    budget: int = 1000
    languages: tuple[str, ...] = ("en", "zh")
    seed: int = 0
    max_tokens: int = 256
    helper_temperature: float = 0.7
    helper_max_tokens: int = 1024
    ratio: float = 0.5
    alpha: float = 0.1
    beta: float = 0.2
    templates: list[str] | None = field(default=None, repr=False)  # default: GPTFuzz's 77

    def check(self, n_questions: int) -> None:
        if not self.fact or not self.fact.strip():
            raise ConfigError("--fact is required: the target's true identity, e.g. "
                              "'I am Qwen, developed by Alibaba Cloud'")
        if self.budget < n_questions:
            raise ConfigError(f"--budget {self.budget} is below one mutant's cost ({n_questions} questions)")


def _score(rows: list[dict]) -> dict:
    n = len(rows)
    hits = {k: sum(r[k] for r in rows) for k in ("loose", "strict", "hard")}
    out = {"queries": n, **{f"{k}_hits": v for k, v in hits.items()},
           **{k: (round(v / n, 4) if n else None) for k, v in hits.items()}}
    out["errors"] = sum(r["error"] is not None for r in rows)
    out["unparsable"] = sum(r["unparsable"] for r in rows)
    return out


def run_ice(target, helper, judge, config: IceConfig, *, progress: bool = True) -> dict:
    """Run ICE; return the result (``scores``, ``per_language``, ``steps``, ``queries``)."""
    from tqdm import tqdm

    questions = identity_questions(config.languages)
    config.check(len(questions))
    templates = list(config.templates) if config.templates is not None else load_templates()
    rng = random.Random(config.seed)
    tree = MCTSExplore(templates, ratio=config.ratio, alpha=config.alpha, beta=config.beta,
                       rng=random.Random(config.seed + 1))
    steps, rows = [], []
    n_steps = config.budget // len(questions)
    bar = tqdm(total=n_steps * len(questions), desc="ICE queries", unit="q", disable=not progress)
    for step in range(n_steps):
        node, path = tree.select()
        kind = rng.choice(MUTATORS)
        other = tree.nodes[rng.randrange(len(tree.nodes))].template
        mutation = mutate(helper, kind, node.template, other, temperature=config.helper_temperature,
                          max_tokens=config.helper_max_tokens, request_seed=config.seed * 100003 + step)
        template_misleading = misleading_names(strip_placeholder(mutation.template), config.fact)
        prompts = [fill(mutation.template, q.text) for q in questions]
        batch = [[{"role": "user", "content": p}] for p in prompts]
        answers = target.chat_many(batch, return_exceptions=True, temperature=0.0, max_tokens=config.max_tokens)
        for a in answers:  # only deterministic rejections are tolerated; outages stop the run (resumable)
            if isinstance(a, ClientError) and not isinstance(a, RequestRejected):
                raise a
        texts = [a if isinstance(a, str) else "" for a in answers]
        verdicts = _judge_all(judge, texts, config.fact)
        step_rows = []
        for q, p, a, v in zip(questions, prompts, answers, verdicts):
            error = str(a) if isinstance(a, ClientError) else None
            misleading = misleading_names(p, config.fact)  # template and question together
            step_rows.append({
                "step": step, "question": q.id, "lang": q.lang, "response": a if error is None else None,
                "error": error, "loose": v.loose, "strict": v.strict, "hard": v.strict and not misleading,
                "misleading": misleading, "unparsable": v.unparsable, "claimed": v.claimed, "reason": v.reason})
        hits = sum(r["loose"] for r in step_rows)
        tree.update(path, hits / len(questions))
        child = tree.add(node, mutation.template) if hits else None
        steps.append({"step": step, "seed_node": node.id, "seed_depth": node.depth, "mutator": kind,
                      "fallback": mutation.fallback, "template": mutation.template,
                      "has_placeholder": "[INSERT PROMPT HERE]" in mutation.template,
                      "misleading_names": template_misleading, "new_node": child.id if child else None,
                      **{k: v for k, v in _score(step_rows).items() if k.endswith("_hits")}})
        rows.extend(step_rows)
        bar.update(len(questions))
    bar.close()
    per_language = {lang: _score([r for r in rows if r["lang"] == lang]) for lang in config.languages}
    per_mutator = {}
    for kind in MUTATORS:
        mine = [s for s in steps if s["mutator"] == kind]
        per_mutator[kind] = {"mutants": len(mine), "loose_hits": sum(s["loose_hits"] for s in mine)}
    return {
        "kind": "ice", "target": target.name, "helper": helper.name, "judge": getattr(judge, "name", "rule"),
        "config": {"fact": config.fact, "budget": config.budget, "languages": list(config.languages),
                   "seed": config.seed, "max_tokens": config.max_tokens, "questions": len(questions),
                   "templates": len(templates), "mutants": len(steps),
                   "unused_budget": config.budget - n_steps * len(questions), "ratio": config.ratio,
                   "alpha": config.alpha, "beta": config.beta, "helper_temperature": config.helper_temperature},
        "scores": _score(rows), "per_language": per_language, "per_mutator": per_mutator,
        "per_question": {q.id: sum(r["loose"] for r in rows if r["question"] == q.id) for q in questions},
        "steps": steps, "queries": rows,
    }


def _judge_all(judge, texts: list[str], fact: str) -> list:
    workers = getattr(getattr(judge, "client", None), "concurrency", 1)
    if workers <= 1:
        return [judge.judge(t, fact) for t in texts]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda t: judge.judge(t, fact), texts))


def write_ice(result: dict, out_dir: str | Path) -> dict:
    """``ice.json`` (scores, config, steps), ``ice_queries.jsonl``, ``ice.md`` and ``ice.png``."""
    return write_summary(result, out_dir, "ice", "queries", ice_markdown, ice_chart)
