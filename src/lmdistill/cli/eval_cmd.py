"""``lmdistill eval``: the five-benchmark ROUGE-L evaluation (MiniLLM protocol)."""

from __future__ import annotations

from lmdistill.cli import COMMANDS, add_limit
from lmdistill.errors import ConfigError
from lmdistill.evaluate.predictors import PROMPT_OVERFLOW
from lmdistill.evaluate.report import markdown_table
from lmdistill.evaluate.run import evaluate_models


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{what} must be comma-separated integers, got {text!r}") from None


#: Said after the cost line when the run is longer than a quick check.
QUICK_HINT = "for a quick check: --seeds 10 --max-new-tokens 64"


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help=COMMANDS["eval"],
        description="Sample with temperature 1.0, top-p 1.0, top-k 0, no repeated 6-grams, at most 256 new tokens, "
                    "prompts over 256 tokens truncated to their first 256 (counted per benchmark), seeds "
                    "10,20,30,40,50 (the MiniLLM/DistiLLM protocol); ROUGE-L (rouge_score, stemmer, "
                    "max over references, x100); mean ± std over seeds. Writes results.json/.csv/.md/.png and "
                    "predictions/<model>/<benchmark>/seed<k>.jsonl; a rerun reuses finished seeds. States its cost "
                    "(models x examples x seeds x new tokens) before it starts.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="local folder, hub id, LoRA adapter folder, or openai:MODEL_NAME@BASE_URL; "
                        "NAME=MODEL sets the display name")
    p.add_argument("--benchmarks", default="dolly,selfinst,vicuna,sni,unni",
                   help="comma-separated bundled benchmarks (name or name:split)")
    p.add_argument("--seeds", default="10,20,30,40,50", help="comma-separated sampling seeds")
    p.add_argument("--out", default="runs/eval", help="output folder")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    add_limit(p, "examples of each benchmark", note=" (N > 0: a quick check, not the protocol)")
    p.add_argument("--template", default="alpaca", choices=["alpaca", "chat"],
                   help="prompt of local models: alpaca (the protocol) or chat (the tokenizer's chat "
                        "template, for instruction-tuned models); recorded in results.json")
    p.add_argument("--greedy", action="store_true", help="greedy decoding, one seed (not the protocol)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="samples per prompt and seed; an example scores the mean over them (not the protocol)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (the protocol's 256)")
    p.add_argument("--max-prompt-length", type=int, default=256,
                   help="longer prompts are truncated or dropped (--prompt-overflow) and counted")
    p.add_argument("--prompt-overflow", default="truncate", choices=PROMPT_OVERFLOW,
                   help="truncate (the protocol: keep a longer prompt's first --max-prompt-length tokens, as "
                        "MiniLLM's PromptDataset) or drop it; both are listed in results.json")
    p.add_argument("--no-repeat-ngram-size", type=int, default=6,
                   help="never repeat an n-gram of prompt + response (transformers' no_repeat_ngram_size; "
                        "the protocol's 6, 0 = off)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    p.add_argument("--api-key-env", default=None,
                   help="environment variable holding the API key of openai: models (default: OPENAI_API_KEY)")
    p.add_argument("--overwrite", action="store_true", help="regenerate seeds even when finished files exist")
    p.add_argument("--average-all", action="store_true",
                   help="average every benchmark (default: UnNI's 1-2-word bucket is shown but not averaged)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    results = evaluate_models(
        args.models, benchmarks, _int_list(args.seeds, "seeds"), args.out, batch_size=args.batch_size,
        limit=args.limit, greedy=args.greedy, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
        max_prompt_length=args.max_prompt_length, device=args.device, dtype=args.dtype,
        api_key_env=args.api_key_env, overwrite=args.overwrite, progress=not args.no_progress, template=args.template,
        no_repeat_ngram_size=args.no_repeat_ngram_size, prompt_overflow=args.prompt_overflow,
        average_all=args.average_all, quick_hint=QUICK_HINT + ("" if args.limit else " --limit 50"))
    print(markdown_table(results))
    print(f"results written to {args.out}/results.json, results.csv, results.md, results.png")
    return 0
