"""``lmdistill quantify ice|rse|whitebox|agreement|report``: how distilled is a model?"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmdistill.cli import COMMANDS, add_limit
from lmdistill.clients import ResponseCache, make_client
from lmdistill.io import write_json
from lmdistill.quantify.facts import resolve_fact
from lmdistill.quantify.ice import IceConfig, run_ice, write_ice
from lmdistill.quantify.judges import LLMJudge, judge_agreement, labelled_examples, make_judge
from lmdistill.quantify.report import combined_report
from lmdistill.quantify.rse import load_prompt_set, run_rse, write_rse
from lmdistill.quantify.similarity import Embedder
from lmdistill.quantify.whitebox import load_whitebox_items, run_whitebox, write_whitebox


def _client_args(p) -> None:
    g = p.add_argument_group("model access")
    g.add_argument("--cache", default=None, help="response cache JSONL (default: OUT/cache.jsonl); reruns resume from it")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight per API model")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request before it is retried")
    g.add_argument("--retries", type=int, default=6,
                   help="retries on 429, 5xx and timeouts (a server that refuses the connection: at most 3)")
    g.add_argument("--base-delay", type=float, default=1.0, help="first back-off delay in seconds (doubles each retry)")
    g.add_argument("--device", default=None, help="device for local models (default: cuda if available)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub) -> None:
    p = sub.add_parser("quantify", help=COMMANDS["quantify"],
                       description="Model specs: openai:MODEL@BASE_URL (any OpenAI-compatible server; key from "
                                   "--api-key-env) or a local Hugging Face folder / hub id.")
    q = p.add_subparsers(dest="quantify_command", metavar="TEST", required=True)

    ice = q.add_parser("ice", help="identity consistency evaluation (jailbreak-fuzzed identity questions)")
    ice.add_argument("--target", required=True, help="the model under test")
    ice.add_argument("--fact", default=None,
                     help="the target's true identity, e.g. 'I am Qwen, developed by Alibaba Cloud' (default: the "
                          "built-in fact of a model `lmdistill models get` makes, also found for its pruned or "
                          "trained copies; required for any other model)")
    ice.add_argument("--helper", required=True, help="model that mutates the jailbreak templates")
    ice.add_argument("--judge", default="rule",
                     help="a judge model spec (LLM judge, the paper's way), or 'rule' (no model; an approximation of "
                          "the paper's LLM judge, labelled so in the reports)")
    ice.add_argument("--judge-prompts", choices=("paper", "lmdistill"), default="paper",
                     help="LLM judge prompts: the reference code's loose/strict requirements or lmdistill's")
    ice.add_argument("--mode", choices=("paper", "lmdistill"), default="paper",
                     help="paper: as the reference code runs it -- system prompt 'You are a helpful "
                          "assistant.', temperature 0, 2048 tokens, 76 random seeds, every mutant a child, reward "
                          "hits/questions^2; lmdistill: no system prompt, 256 tokens, only hit mutants join the tree")
    ice.add_argument("--budget", type=int, default=1000, help="target queries (each mutant costs one per question)")
    ice.add_argument("--languages", default="en,zh", help="question languages: en, zh or en,zh")
    ice.add_argument("--seed", type=int, default=0, help="seed of the search (template draws, mutations)")
    ice.add_argument("--max-tokens", type=int, default=None,
                     help="answer length limit for the target (default: 2048 in paper mode, 256 in lmdistill mode)")
    ice.add_argument("--helper-temperature", type=float, default=None,
                     help="default: 0 (greedy, as the reference) in paper mode, 0.7 in lmdistill mode")
    ice.add_argument("--helper-max-tokens", type=int, default=None,
                     help="cap on a mutation's new tokens (default: 2048 in paper mode, 1024 in lmdistill mode)")
    ice.add_argument("--helper-length-factor", type=float, default=2.0,
                     help="a mutation may write at most this many times the (estimated) tokens of the template(s) "
                          "it rewrites, at least 256, within --helper-max-tokens; 0 = only the cap (the reference)")
    ice.add_argument("--mutants-per-round", type=int, default=1,
                     help="mutants whose requests are batched together; 1 = the reference's search, one "
                          "mutant per selection; K > 1 makes K selections before their rewards are known")
    ice.add_argument("--expand", choices=("sentences", "prepend"), default=None,
                     help="an expand mutant is the helper's new sentences alone (sentences: the reference's; paper "
                          "mode's default) or them in front of the seed (prepend: lmdistill before issue 29; "
                          "lmdistill mode's default)")
    ice.add_argument("--join", choices=("concat", "blank-line"), default=None,
                     help="a question goes right after a template without the placeholder (concat: the reference's; "
                          "paper mode's default) or after a blank line (blank-line: lmdistill before issue 29; "
                          "lmdistill mode's default)")
    ice.add_argument("--out", required=True, help="output folder (results, report, response cache)")
    _client_args(ice)
    ice.set_defaults(func=cmd_ice)

    rse = q.add_parser("rse", help="response similarity to a reference model (LLM judge and judge-free)")
    rse.add_argument("--target", required=True, help="the model under test (a model spec)")
    rse.add_argument("--reference", required=True, help="the model it is compared with, e.g. its suspected teacher")
    rse.add_argument("--judge", default=None, help="judge model spec; omit for judge-free similarity only")
    rse.add_argument("--prompts", nargs="+", default=["arena-hard"], help="arena-hard and/or JSONL/TXT files (one set each)")
    add_limit(rse, "prompts of each set")
    rse.add_argument("--embedding-model", default=None, help="local model folder for embedding cosine")
    rse.add_argument("--max-tokens", type=int, default=512, help="answer length limit of both models")
    rse.add_argument("--max-reasks", type=int, default=2, help="re-asks of the judge after a malformed reply")
    rse.add_argument("--out", required=True, help="output folder (results, report, response cache)")
    _client_args(rse)
    rse.set_defaults(func=cmd_rse)

    wb = q.add_parser("whitebox", help="teacher-student token-level KL and top-1 agreement (local models)")
    wb.add_argument("--teacher", required=True,
                    help="local folder or hub id of the reference model (writes the answers, unless --use-references)")
    wb.add_argument("--student", required=True,
                    help="local folder or hub id of the model under test (scored on the same tokens; same tokenizer)")
    wb.add_argument("--prompts", default="arena-hard", help="arena-hard or a JSONL/TXT file")
    add_limit(wb, "prompts", default=50)
    wb.add_argument("--max-new-tokens", type=int, default=128, help="longest teacher answer in tokens")
    wb.add_argument("--use-references", action="store_true",
                    help="teacher-force on the file's output/reference field instead of the teacher's greedy answer")
    wb.add_argument("--batch-size", type=int, default=8, help="prompts generated and scored together")
    wb.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    wb.add_argument("--out", required=True, help="output folder")
    wb.add_argument("--no-progress", action="store_true", help="no progress bar")
    wb.set_defaults(func=cmd_whitebox)

    ag = q.add_parser("agreement", help="agreement of an identity judge with the labelled examples")
    ag.add_argument("--judge", default="rule", help="'rule' or a judge model spec")
    ag.add_argument("--judge-prompts", choices=("paper", "lmdistill"), default="paper",
                    help="LLM judge prompts: the reference code's or lmdistill's")
    ag.add_argument("--labels", default=None, help="JSONL with response, fact, loose, strict (default: the shipped set)")
    ag.add_argument("--out", default=None, help="write the full result (with disagreements) as JSON here")
    ag.add_argument("--cache", default=None, help="response cache JSONL of the judge (default: none)")
    ag.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    ag.set_defaults(func=cmd_agreement)

    rep = q.add_parser("report", help="one report (markdown, JSON, charts) from several run folders")
    rep.add_argument("dirs", nargs="+", help="run folders of quantify ice, rse and whitebox")
    rep.add_argument("--out", required=True, help="output folder")
    rep.set_defaults(func=cmd_report)


def _open(args, out: Path):
    cache = ResponseCache(args.cache or out / "cache.jsonl")
    kw = dict(api_key_env=args.api_key_env, timeout=args.timeout, max_retries=args.retries,
              base_delay=args.base_delay, concurrency=args.concurrency, device=args.device, cache=cache)
    return cache, kw


def cmd_ice(args) -> int:
    out = Path(args.out)
    fact, fact_source = resolve_fact(args.fact, args.target)   # before any model loads
    if fact_source != "--fact":
        print(f"ICE fact: {fact!r} ({fact_source})", file=sys.stderr)
    cache, kw = _open(args, out)
    made: dict = {}  # one client (one local model, one batch) per spec, shared by the roles that name it

    def client(spec):
        if spec not in made:
            made[spec] = make_client(spec, **kw)
        return made[spec]

    target, helper = client(args.target), client(args.helper)
    judge = (make_judge("rule") if args.judge in (None, "", "rule")
             else LLMJudge(client(args.judge), prompts=args.judge_prompts))
    config = IceConfig(fact=fact, fact_source=fact_source, expand=args.expand, join=args.join, mode=args.mode,
                       budget=args.budget, seed=args.seed, max_tokens=args.max_tokens,
                       languages=tuple(x.strip() for x in args.languages.split(",") if x.strip()),
                       helper_temperature=args.helper_temperature, helper_max_tokens=args.helper_max_tokens,
                       helper_length_factor=args.helper_length_factor, mutants_per_round=args.mutants_per_round)
    result = run_ice(target, helper, judge, config, progress=not args.no_progress)
    summary = write_ice(result, out)
    cache.close()
    print(json.dumps({"scores": summary["scores"], "per_language": summary["per_language"], "judge": summary["judge_label"],
                      "mode": summary["config"]["mode"], "out": str(out)}, indent=2, ensure_ascii=False))
    return 0


def cmd_rse(args) -> int:
    out = Path(args.out)
    sets = dict(load_prompt_set(spec, args.limit) for spec in args.prompts)
    cache, kw = _open(args, out)
    made: dict = {}  # one client per spec, shared by the roles that name it

    def client(spec):
        if spec not in made:
            made[spec] = make_client(spec, **kw)
        return made[spec]

    target, reference = client(args.target), client(args.reference)
    judge = client(args.judge) if args.judge else None
    embedder = Embedder(args.embedding_model, device=args.device) if args.embedding_model else None
    result = run_rse(target, reference, sets, judge=judge, embedder=embedder, max_tokens=args.max_tokens,
                     max_reasks=args.max_reasks, progress=not args.no_progress)
    summary = write_rse(result, out)
    cache.close()
    print(json.dumps({"similarity (ours, judge-free)": summary["similarity"]["mean_of_sets"],
                      "judge": (summary["judge_scores"] or {}).get("mean_of_sets"), "out": str(out)},
                     indent=2, ensure_ascii=False))
    return 0


def cmd_whitebox(args) -> int:
    items = load_whitebox_items(args.prompts, args.limit)
    result = run_whitebox(args.teacher, args.student, items, max_new_tokens=args.max_new_tokens,
                          use_references=args.use_references, device=args.device, progress=not args.no_progress,
                          batch_size=args.batch_size)
    summary = write_whitebox(result, args.out)
    print(json.dumps({k: summary[k] for k in ("prompts", "tokens", "kl_mean", "top1_agreement")}, indent=2,
                     ensure_ascii=False))
    return 0


def cmd_agreement(args) -> int:
    cache = ResponseCache(args.cache) if args.cache else None
    judge = make_judge(args.judge, cache=cache, api_key_env=args.api_key_env, prompts=args.judge_prompts)
    result = judge_agreement(judge, labelled_examples(args.labels))
    if args.out:
        write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "disagreements"}, indent=2, ensure_ascii=False))
    print(f"{len(result['disagreements'])} disagreement(s)" + (f"; details in {args.out}" if args.out else ""))
    return 0


def cmd_report(args) -> int:
    summary = combined_report(args.dirs, args.out)
    print(f"wrote {Path(args.out) / 'report.md'} ({', '.join(summary['charts']) or 'no charts'})")
    return 0
