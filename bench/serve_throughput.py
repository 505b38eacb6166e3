"""Issue 19's batching benchmark: ``lmdistill serve`` with continuous batching on vs off, same model, same run.

Starts a real ``lmdistill serve`` subprocess twice, once with ``--max-batch-size 0`` (no batching: each request
decodes alone on the HF forward and concurrent requests take turns token by token, the path before issue 19) and
once with ``--max-batch-size N`` (default 16), and at each client count in ``--clients`` sends ``--requests``
greedy chat completions (``--max-tokens`` each, prompts cycling over a fixed list) from that many client
threads, each sending its next request when its previous answer arrived. Per mode and client count it prints
completion tokens per second, requests per second, and the p50 / p95 request latency, then the on / off
ratios; and how many of the greedy answers are the same text in both modes (float32: a row decoded in a
batch can differ from the row alone by rounding, so a near-tie between two tokens may go the other way).

The model: ``--model DIR`` (default ``runs/smollm2``, SmolLM2-135M-Instruct from
``lmdistill models get smollm2-135m-instruct --out runs/smollm2``; if absent, the bench models' tiny
teacher, built on first use under ``bench/out``). ``uptime``'s load average is printed before and after
(the CPU may be shared).

    .venv/bin/python bench/serve_throughput.py [--model DIR] [--clients 1 4 16] [--requests 4 12 32]
                                               [--max-tokens 24] [--batch 16] [--server-threads 1]
                                               [--out FILE.json] [--quick]

``--quick``: a smoke run (``make bench-smoke``): the tiny bench teacher (built in a temporary folder), 1 and 4
clients sending 2 and 4 requests of at most 8 tokens, batch 4, both servers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from bench_server import start_server

PROMPTS = [
    "Give three tips for staying healthy.", "What is the capital of France?", "Write a haiku about autumn.",
    "Explain photosynthesis in one paragraph.", "How do I boil an egg?", "Name five animals that live in the sea.",
    "What is 17 times 23?", "Describe the colour blue to someone who cannot see.", "Why do cats purr?",
    "Translate 'good morning' into Spanish.", "What is a prime number?", "Suggest a name for a pet turtle.",
    "Summarise the plot of Romeo and Juliet.", "What causes rain?", "List three uses of a paperclip.",
    "Who wrote Pride and Prejudice?",
]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """``requests`` chat completions from ``clients`` threads; throughput, latency and the answers."""
    answers: dict[int, str] = {}
    latencies: list[float] = []
    tokens = [0]

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as c:
            for i in range(k, requests, clients):
                body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                        "max_tokens": max_tokens, "temperature": 0}
                t = time.perf_counter()
                r = c.post(f"{url}/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - t)
                r.raise_for_status()
                out = r.json()
                answers[i] = out["choices"][0]["message"]["content"]
                tokens[0] += out["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"clients": clients, "requests": requests, "tokens": tokens[0], "wall_s": wall,
            "tok_s": tokens[0] / wall, "req_s": requests / wall, "p50_s": statistics.median(lat),
            "p95_s": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))], "answers": answers}


def run_mode(model: str, batch: int, clients: list[int], requests: list[int], max_tokens: int,
             threads: int) -> list[dict]:
    proc, url = start_server(model, ["--max-batch-size", str(batch), "--max-queue", str(max(64, max(clients)))], threads)
    try:
        with httpx.Client(timeout=600) as c:  # warm up: the first forwards allocate
            for n in (1, 2):
                body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4 * n, "temperature": 0}
                c.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
        rows = []
        for k, n in zip(clients, requests):
            row = {"mode": f"batch {batch}" if batch else "off", **load(url, k, n, max_tokens)}
            print(f"  {row['mode']:>9} clients {k:>2}: {row['tok_s']:7.1f} tok/s {row['req_s']:6.2f} req/s "
                  f"p50 {row['p50_s']:6.2f} s p95 {row['p95_s']:6.2f} s ({row['tokens']} tokens, "
                  f"{row['wall_s']:.1f} s)", flush=True)
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/smollm2")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, nargs="+", default=[4, 12, 32],
                    help="requests per client count (one number per --clients entry)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16, help="--max-batch-size of the batched server")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="torch threads of the server (OMP_NUM_THREADS; default 1: on a shared CPU, two threads "
                         "waiting on each other slow the unbatched path's small ops several-fold; 0: torch's "
                         "default)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny teacher, clients 1 4, requests 2 4, 8 tokens, batch 4")
    args = ap.parse_args()
    if len(args.requests) != len(args.clients):
        raise SystemExit("--requests needs one number per --clients entry")
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_models import models

    if args.quick:
        args.clients, args.requests, args.max_tokens, args.batch = [1, 4], [2, 4], 8, 4
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
            return measure(args, str(models("tiny", Path(tmp))[0]))
    model = args.model
    if not (Path(model) / "config.json").exists():
        model = str(models("tiny", Path(__file__).parent / "out" / "models")[0])
        print(f"{args.model} not found; using the tiny bench teacher {model}")
    return measure(args, model)


def measure(args, model: str) -> None:
    print(f"model {model}, at most {args.max_tokens} tokens per request, greedy, {args.server_threads or 'default'} "
          f"server thread(s); before: {uptime()}", flush=True)
    t0 = time.perf_counter()
    off = run_mode(model, 0, args.clients, args.requests, args.max_tokens, args.server_threads)
    on = run_mode(model, args.batch, args.clients, args.requests, args.max_tokens, args.server_threads)
    print(f"after: {uptime()}; {time.perf_counter() - t0:.0f} s in all\n")
    print("| mode | clients | requests | tokens | tok/s | req/s | p50 latency (s) | p95 latency (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in off + on:
        print(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | "
              f"{r['req_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} |")
    print("\n| clients | tok/s on / off | req/s on / off | p50 on / off | p95 on / off | same greedy text |")
    print("|---:|---:|---:|---:|---:|---:|")
    for a, b in zip(off, on):
        same = sum(a["answers"][i] == b["answers"][i] for i in a["answers"])
        print(f"| {a['clients']} | {b['tok_s'] / a['tok_s']:.2f}x | {b['req_s'] / a['req_s']:.2f}x | "
              f"{b['p50_s'] / a['p50_s']:.2f}x | {b['p95_s'] / a['p95_s']:.2f}x | {same}/{len(a['answers'])} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": model, "max_tokens": args.max_tokens,
                                              "rows": [{k: v for k, v in r.items() if k != "answers"}
                                                       for r in off + on]}, indent=2))


if __name__ == "__main__":
    main()
