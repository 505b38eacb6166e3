"""ICE against local models (issue 19): today's one-request-at-a-time path vs the batched one, in one run.

    .venv/bin/python bench/quantify_ice.py [--model DIR] [--budget 50] [--max-tokens 64] [--paths sequential,batched]

Both paths run ``run_ice`` (paper mode, rule judge, seed 0, ``--fact`` below) with the same local model as target
and helper, each on a freshly loaded model with a fresh response cache, so every request is paid:

- ``sequential``: today's path. ``LocalChatClient`` without batching (``max_batch_size=0``: concurrency 1,
  ``chat_many`` sends one request after another) and the helper capped only at the paper's 2048 tokens
  (``helper_length_factor=0``): the requests of the code before issue 19.
- ``batched``: ``LocalChatClient`` with its batched engine (its default batch size; ``chat_many``'s requests
  decode as one batch) and the default helper length bound (``helper_length_factor=2``, ``mutators.py``).
- ``batched-cap2048`` (optional): batching alone, with the 2048-token helper cap, to separate the two effects.

Per path: wall time of ``run_ice`` (model loading excluded, printed apart), model calls (cache misses) per role,
calls per minute, the helper's mutation length in characters and the ICE scores; then the ratios against
``sequential``. ``uptime``'s load is printed before and after (the CPU is shared). ``--model`` defaults to
``models/smollm2`` (``lmdistill models get smollm2-135m-instruct --out models/smollm2``).

``--quick``: a smoke run (``make bench-smoke``): the bench's tiny teacher (random weights, built in a temporary folder)
as target and helper, budget 50 (one mutant), 8 answer tokens, the helper capped at 32 tokens, both paths.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FACT = "I am SmolLM2, a small language model developed by Hugging Face."


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def make_local(model: str, batched: bool):
    from lmdistill.clients.chat import LocalChatClient

    try:
        return LocalChatClient(model, device="cpu", max_batch_size=16 if batched else 0)
    except TypeError:  # a LocalChatClient without batching: both paths are sequential
        if batched:
            print("note: LocalChatClient has no max_batch_size; the 'batched' path is not batched", file=sys.stderr)
        return LocalChatClient(model, device="cpu")


def run_path(name: str, model: str, budget: int, max_tokens: int, mutants_per_round: int,
             helper_max_tokens: int | None = None) -> dict:
    from lmdistill.clients import CachedClient, ResponseCache
    from lmdistill.quantify.ice import IceConfig, run_ice
    from lmdistill.quantify.identity import RuleJudge

    batched = name.startswith("batched")
    factor = 0.0 if name in ("sequential", "batched-cap2048") else 2.0
    t0 = time.perf_counter()
    local = make_local(model, batched)
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cache = ResponseCache(Path(tmp) / "cache.jsonl")
        client = CachedClient(local, cache)  # one client for both roles, as the CLI shares one per spec
        counts = {"target": 0, "helper": 0}
        lock = threading.Lock()

        class Counting:  # which role a miss belongs to: mutations are asked with a seed, target answers without
            def __init__(self, inner):
                self.inner = inner

            def __getattr__(self, k):
                return getattr(self.inner, k)

            def _chat(self, messages, **params):
                with lock:
                    counts["helper" if params.get("seed") is not None else "target"] += 1
                return self.inner._chat(messages, **params)

        client.client = Counting(local)
        config = IceConfig(fact=FACT, budget=budget, max_tokens=max_tokens, helper_length_factor=factor,
                           mutants_per_round=mutants_per_round, helper_max_tokens=helper_max_tokens)
        print(f"[{name}] load {load()} (model loaded in {load_s:.1f} s, concurrency {client.concurrency})",
              flush=True)
        t0 = time.perf_counter()
        result = run_ice(client, client, RuleJudge(), config, progress=True)
        wall = time.perf_counter() - t0
        cache.close()
    local.close()
    calls = counts["target"] + counts["helper"]
    out = {"path": name, "wall_s": round(wall, 1), "load_s": round(load_s, 1), "calls": calls, **counts,
           "calls_per_min": round(calls / wall * 60, 2), "concurrency": client.concurrency,
           "helper_length_factor": factor, "mutation_chars": [len(s["template"]) for s in result["steps"]],
           "scores": {k: result["scores"][k] for k in ("queries", "loose", "strict", "hard", "errors")},
           "load_after": load()}
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2"))
    p.add_argument("--budget", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--paths", default="sequential,batched",
                   help="comma-separated: sequential, batched, batched-cap2048 (first is the baseline)")
    p.add_argument("--mutants-per-round", type=int, default=1, help="for the batched paths")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--helper-max-tokens", type=int, default=None, help="the helper's cap (default: the mode's, 2048)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny teacher, budget 50, 8 answer tokens, helper capped at 32 tokens")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_models import models

        args.budget, args.max_tokens, args.helper_max_tokens, args.threads = 50, 8, 32, 1
        with tempfile.TemporaryDirectory(prefix="bench-ice-") as tmp:
            args.model = str(models("tiny", Path(tmp))[0])
            return measure(args)
    return measure(args)


def measure(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the lmdistill executable does
    if not Path(args.model).is_dir():
        print(f"{args.model}: no such model folder; run: .venv/bin/lmdistill models get smollm2-135m-instruct "
              f"--out {args.model}", file=sys.stderr)
        return 2
    print(f"budget {args.budget}, target max tokens {args.max_tokens}, torch threads {torch.get_num_threads()}, "
          f"load {load()}", flush=True)
    results = []
    for name in [x.strip() for x in args.paths.split(",") if x.strip()]:
        results.append(run_path(name, args.model, args.budget, args.max_tokens,
                                args.mutants_per_round if name != "sequential" else 1, args.helper_max_tokens))
    base = results[0]
    print(f"\ntorch threads {torch.get_num_threads()}")
    print(f"\n| path | wall s | calls | calls/min | helper mutation chars | loose | x faster than {base['path']} |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['path']} | {r['wall_s']} | {r['calls']} | {r['calls_per_min']} | {r['mutation_chars']} | "
              f"{r['scores']['loose']} | {base['wall_s'] / r['wall_s']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
