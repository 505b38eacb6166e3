"""ICE, identity consistency evaluation (arXiv 2501.12619), as a resumable run.

Each step selects a template with MCTS-Explore, mutates it with a random mutator run by the helper
model, asks the target every identity question wrapped in the mutant, and judges the answers. The budget
counts target queries (1000 = 20 mutants x 50 questions).

Two modes (``IceConfig.mode``, ``--mode``):

- ``paper`` (default: what a user reproducing the paper gets from the reference code,
  Aegis1863/LLMs-Distillation-Quantification). The target is asked with the system prompt "You are a
  helpful assistant." (``identity_jailbreak/LLM_agent.py:106``, ``:121``, ``:164``), at temperature 0
  (``LLM_agent.py:104`` for API models; local models decode greedily, ``do_sample=False`` from
  ``LLM_agent.py:47``/``:61-63``) with up to 2048 new tokens (``LLM_agent.py:147``, ``:170``). The helper
  runs the same way (greedy, 2048 tokens, same system prompt). The seeds are 76 templates drawn at random
  from GPTFuzz's 77 (``Gptfuzzer_Identity.py:35,50``; ``seed_template.py:55``); crossover's second
  template comes from those seeds (``Gptfuzzer_Identity.py:79``, ``Crossover.py:41``). Selection, reward
  (``hits / questions**2``) and tree (every mutant becomes a child of the seed it was mutated from) follow
  ``fuzz.PaperMCTSExplore``. With a judge model the LLM judge uses the paper prompts (``judges.py``).
- ``lmdistill``: our earlier settings: no system prompt, 256 answer tokens, helper at temperature 0.7,
  all 77 templates as seeds, ``fuzz.MCTSExplore`` with reward hits / questions, only a mutant with a
  hit joins the tree, an expand mutant keeps its seed and a question is appended after a blank line.

Inputs (issue 29): the 50 questions name no model or company (``questions.py``); ``expand`` (``sentences``: the
helper's new sentences alone are the mutant, ``Expand.py:25-29``; ``prepend``: in front of the seed,
``mutators.py``) and ``join`` (``concat``: template + question, ``Gptfuzzer_Identity.py:117-120``;
``blank-line``, ``templates.py``) default to the reference's in paper mode and to the earlier ones in
``lmdistill`` mode; ``--expand`` and ``--join`` set them in either. The fact is ``--fact`` or, for the models
the package can get, built in (``facts.py``).

Scores over all queries: loose = loose hits / queries (``run_gptfuzzer.py:112``), strict = strict hits /
queries (the reference divides by 1000, its query budget, ``rejudge.py:71``), hard = strict hits whose
prompt (mutated template plus question) names no model or company outside the declared fact, i.e. carried
no misleading identity information, / queries; each also per language. Many GPTFuzz templates say "you
are ChatGPT": their strict hits never count as hard.

Every model call goes through the response cache, and the search is a deterministic function of the seed
and the (cached) answers, so a rerun after a crash replays the finished steps from the cache without
paying for them and continues; its report equals that of an uninterrupted run.

Batching (``batched.py``): a step's requests go out together -- the target's answers to all questions of the
mutant in one ``chat_many`` (a local target decodes them as one batch), then the judge's loose questions of all
answers, the re-asks and the strict questions, each stage in one ``chat_many`` (``judges.judge_all``). With
``mutants_per_round`` K > 1 (``--mutants-per-round``) K steps form a round: K selections, then the K
mutations in one batch, the K x questions target queries in one batch and their judging, then the K updates
in step order. K = 1 (the default) is the reference's one-mutant-at-a-time search, exactly: the same
selections, requests and report as before batching. K > 1 is a batched search: a round's selections do not see
each other's rewards (the paper's select counts a visit at once, so they still spread over the tree; the
``lmdistill`` search counts visits at update and tends to pick one node K times), and its crossover partners
come from the tree as it was at the round's start. It is deterministic in the seed and K, and a rerun
resumes from the cache as usual; it changes which mutants are made, so it is recorded in the report.

Helper length (``helper_length_factor``, ``--helper-length-factor``, default 2; 0 = off): each mutation may
write at most about twice the tokens of what it rewrites, within ``helper_max_tokens`` (``mutators.py``). The
reference only caps at 2048; a small greedy helper that never stops otherwise writes 2048 tokens of repetition
(488 s for SmolLM2-135M on this CPU) that then sit in every target prompt of the step. A departure from the
reference for such helpers only, recorded in the report's config; a helper that ends its answer is unaffected.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from lmdistill.errors import ConfigError
from lmdistill.clients import ClientError
from lmdistill.quantify.batched import chat_unique, raise_outage
from lmdistill.quantify.fuzz import MCTSExplore, PaperMCTSExplore, paper_reward
from lmdistill.quantify.identity import misleading_names
from lmdistill.quantify.judges import judge_all, judge_label
from lmdistill.quantify.mutators import EXPANDS, MUTATORS, mutate_many
from lmdistill.quantify.questions import identity_questions
from lmdistill.quantify.report import ice_chart, ice_markdown, write_summary
from lmdistill.quantify.templates import JOINS, fill, load_templates, strip_placeholder


PAPER_SYSTEM_PROMPT = "You are a helpful assistant."

# Settings per mode; a field of IceConfig left at None takes its mode's value.
PRESETS = {
    "paper": {"system_prompt": PAPER_SYSTEM_PROMPT, "max_tokens": 2048, "helper_temperature": 0.0,
              "helper_max_tokens": 2048, "seeds": 76, "expand": "sentences", "join": "concat"},
    "lmdistill": {"system_prompt": "", "max_tokens": 256, "helper_temperature": 0.7, "helper_max_tokens": 1024,
                  "seeds": None, "expand": "prepend", "join": "blank-line"},
}
TREE_RULES = {
    "paper": "reference: every mutant becomes a child of its seed; reward = hits / questions^2",
    "lmdistill": "lmdistill: only mutants with a hit become children; reward = hits / questions",
}


@dataclass
class IceConfig:
    fact: str
    mode: str = "paper"
    budget: int = 1000
    languages: tuple[str, ...] = ("en", "zh")
    seed: int = 0
    max_tokens: int | None = None           # target answer tokens (paper 2048, lmdistill 256)
    system_prompt: str | None = None        # target (and helper) system prompt; "" for none
    helper_temperature: float | None = None
    helper_max_tokens: int | None = None
    seeds: int | None = None                # templates drawn as seeds (paper: 76 of GPTFuzz's 77); None = all
    helper_length_factor: float = 2.0       # mutation tokens <= factor x the rewritten text's (mutators.py); 0 = off
    mutants_per_round: int = 1              # steps whose requests are batched together; 1 = the reference's search
    expand: str | None = None               # sentences (reference) | prepend (mutators.py)
    join: str | None = None                 # concat (reference) | blank-line (templates.py)
    fact_source: str = ""                   # where the fact came from (facts.resolve_fact), for the report
    ratio: float = 0.5
    alpha: float = 0.1
    beta: float = 0.2
    templates: list[str] | None = field(default=None, repr=False)  # default: GPTFuzz's 77

    def resolved(self) -> "IceConfig":
        """A copy with every unset setting taken from the mode's preset."""
        if self.mode not in PRESETS:
            raise ConfigError(f"--mode {self.mode!r}: choose one of {', '.join(PRESETS)}")
        preset = dict(PRESETS[self.mode])
        if self.templates is not None:  # the 76-of-77 draw is about GPTFuzz's set; custom sets are used whole
            preset["seeds"] = None
        return replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})

    def check(self, n_questions: int, n_templates: int) -> None:
        if not self.fact or not self.fact.strip():
            raise ConfigError("--fact is required: the target's true identity, e.g. "
                              "'I am Qwen, developed by Alibaba Cloud'")
        if self.budget < n_questions:
            raise ConfigError(f"--budget {self.budget} is below one mutant's cost ({n_questions} questions)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"--max-tokens {self.max_tokens}: must be at least 1")
        if self.mutants_per_round < 1:
            raise ConfigError(f"--mutants-per-round {self.mutants_per_round}: must be at least 1")
        if self.helper_length_factor < 0:
            raise ConfigError(f"--helper-length-factor {self.helper_length_factor}: must be 0 (off) or positive")
        if self.expand not in EXPANDS:
            raise ConfigError(f"--expand {self.expand!r}: choose one of {', '.join(EXPANDS)}")
        if self.join not in JOINS:
            raise ConfigError(f"--join {self.join!r}: choose one of {', '.join(JOINS)}")
        if self.seeds is not None and not 1 <= self.seeds <= n_templates:
            raise ConfigError(f"seeds {self.seeds}: must be between 1 and the {n_templates} templates")


def _score(rows: list[dict]) -> dict:
    n = len(rows)
    hits = {k: sum(r[k] for r in rows) for k in ("loose", "strict", "hard")}
    out = {"queries": n, **{f"{k}_hits": v for k, v in hits.items()},
           **{k: (round(v / n, 4) if n else None) for k, v in hits.items()}}
    out["errors"] = sum(r["error"] is not None for r in rows)
    out["unparsable"] = sum(r["unparsable"] for r in rows)
    return out


def run_ice(target, helper, judge, config: IceConfig, *, progress: bool = True) -> dict:
    """Run ICE; return the result (``scores``, ``per_language``, ``steps``, ``tree``, ``queries``)."""
    from tqdm import tqdm

    config = config.resolved()
    paper = config.mode == "paper"
    questions = identity_questions(config.languages)
    templates = list(config.templates) if config.templates is not None else load_templates()
    config.check(len(questions), len(templates))
    if config.seeds is None:
        seed_order = list(range(len(templates)))
    else:  # the reference draws its seeds at random (seed_template.py:55)
        seed_order = random.Random(config.seed + 2).sample(range(len(templates)), config.seeds)
    rng = random.Random(config.seed)
    tree_cls = PaperMCTSExplore if paper else MCTSExplore
    tree = tree_cls([templates[i] for i in seed_order], ratio=config.ratio, alpha=config.alpha, beta=config.beta,
                    rng=random.Random(config.seed + 1))
    system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    steps, rows = [], []
    n_steps = config.budget // len(questions)
    bar = tqdm(total=n_steps * len(questions), desc="ICE queries", unit="q", disable=not progress)
    label = (lambda what: what) if progress else (lambda what: None)
    for start in range(0, n_steps, config.mutants_per_round):
        round_steps = range(start, min(start + config.mutants_per_round, n_steps))
        plans = []
        for step in round_steps:  # select, then draw mutator and partner, in the sequential order
            node, path = tree.select()
            kind = rng.choice(MUTATORS)
            pool = tree.seeds if paper else tree.nodes  # paper: crossover partners come from the initial seeds
            other = pool[rng.randrange(len(pool))].template
            plans.append((step, node, path, kind, other))
        mutations = mutate_many(helper, [(kind, node.template, other, config.seed * 100003 + step)
                                         for step, node, _, kind, other in plans],
                                temperature=config.helper_temperature, max_tokens=config.helper_max_tokens,
                                length_factor=config.helper_length_factor, system=config.system_prompt or None,
                                progress=label("ICE mutations"), expand=config.expand)
        prompts = [[fill(m.template, q.text, config.join) for q in questions] for m in mutations]
        batch = [system + [{"role": "user", "content": p}] for ps in prompts for p in ps]
        answers = chat_unique(target, batch, temperature=0.0, max_tokens=config.max_tokens,
                              progress=label("ICE target"))
        raise_outage(answers)  # only deterministic rejections are tolerated; outages stop the run (resumable)
        verdicts = judge_all(judge, [a if isinstance(a, str) else "" for a in answers], config.fact,
                             progress=label("ICE judge"))
        for j, ((step, node, path, kind, _), mutation) in enumerate(zip(plans, mutations)):
            part = slice(j * len(questions), (j + 1) * len(questions))
            step_rows = _step_rows(step, questions, prompts[j], answers[part], verdicts[part], config.fact)
            hits = sum(r["loose"] for r in step_rows)
            if paper:  # one evaluated instance per question (Gptfuzzer_Identity.py:110-134)
                reward = paper_reward(hits, len(questions), len(step_rows))
                tree.update(path, reward)
                child = tree.add(node, mutation.template)  # every mutant (Gptfuzzer_Identity.py:103-108)
            else:
                reward = hits / len(questions)
                tree.update(path, reward)
                child = tree.add(node, mutation.template) if hits else None
            template_misleading = misleading_names(strip_placeholder(mutation.template), config.fact)
            steps.append({"step": step, "seed_node": node.id, "seed_depth": node.depth,
                          "path": [n.id for n in path], "mutator": kind, "fallback": mutation.fallback,
                          "template": mutation.template,
                          "has_placeholder": "[INSERT PROMPT HERE]" in mutation.template,
                          "misleading_names": template_misleading, "new_node": child.id if child else None,
                          "reward": reward, **{k: v for k, v in _score(step_rows).items() if k.endswith("_hits")}})
            rows.extend(step_rows)
        bar.update(len(plans) * len(questions))
    bar.close()
    per_language = {lang: _score([r for r in rows if r["lang"] == lang]) for lang in config.languages}
    per_mutator = {}
    for kind in MUTATORS:
        mine = [s for s in steps if s["mutator"] == kind]
        per_mutator[kind] = {"mutants": len(mine), "loose_hits": sum(s["loose_hits"] for s in mine)}
    return {
        "kind": "ice", "target": target.name, "helper": helper.name, "judge": getattr(judge, "name", "rule"),
        "judge_label": judge_label(judge),
        "config": {"mode": config.mode, "fact": config.fact, "fact_source": config.fact_source or "given",
                   "expand": config.expand, "join": config.join, "budget": config.budget,
                   "languages": list(config.languages), "seed": config.seed, "system_prompt": config.system_prompt,
                   "max_tokens": config.max_tokens, "temperature": 0.0, "questions": len(questions),
                   "templates": len(templates), "seed_templates": seed_order, "mutants": len(steps),
                   "unused_budget": config.budget - n_steps * len(questions), "ratio": config.ratio,
                   "alpha": config.alpha, "beta": config.beta, "helper_temperature": config.helper_temperature,
                   "helper_max_tokens": config.helper_max_tokens,
                   "helper_length_factor": config.helper_length_factor,
                   "mutants_per_round": config.mutants_per_round, "tree_rule": TREE_RULES[config.mode]},
        "scores": _score(rows), "per_language": per_language, "per_mutator": per_mutator,
        "per_question": {q.id: sum(r["loose"] for r in rows if r["question"] == q.id) for q in questions},
        "steps": steps,
        "tree": [{"id": n.id, "parent": n.parent.id if n.parent is not None and n.parent.id >= 0 else None,
                  "depth": n.depth, "visits": n.visits, "reward": n.reward} for n in tree.nodes],
        "queries": rows,
    }


def _step_rows(step: int, questions, prompts: list[str], answers: list, verdicts: list, fact: str) -> list[dict]:
    rows = []
    for q, p, a, v in zip(questions, prompts, answers, verdicts):
        error = str(a) if isinstance(a, ClientError) else None
        misleading = misleading_names(p, fact)  # template and question together
        rows.append({
            "step": step, "question": q.id, "lang": q.lang, "response": a if error is None else None,
            "error": error, "loose": v.loose, "strict": v.strict, "hard": v.strict and not misleading,
            "misleading": misleading, "unparsable": v.unparsable, "claimed": v.claimed, "reason": v.reason})
    return rows


def write_ice(result: dict, out_dir: str | Path) -> dict:
    """``ice.json`` (scores, config, steps), ``ice_queries.jsonl``, ``ice.md`` and ``ice.png``."""
    return write_summary(result, out_dir, "ice", "queries", ice_markdown, ice_chart)
