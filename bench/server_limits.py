"""Issue 18's server probe: memory and latency of ``lmdistill serve`` under oversized requests.

Starts a real ``lmdistill serve`` subprocess on a tiny model (built with ``lmdistill models build tiny-teacher``
unless ``--model DIR`` is given) and prints, for each body limit in ``--limits`` ("default" = the server's
own, sized to the model's context; a number = ``--max-body-bytes``):

* the server's RSS before, at its peak during, and after ten concurrent 5 MB chat prompts (their statuses:
  413 under the default limit; 400 ``context_length_exceeded`` from the character bound with a limit big
  enough to let them in), and the burst's wall time;
* the latency of small requests (a short chat completion, and ``GET /health``) sent one after another while
  the burst is in flight: the worst and the median;
* a 50 MB body, with ``Content-Length`` and chunked: the status it gets (413 expected, not a reset).

    .venv/bin/python bench/server_limits.py [--model DIR] [--limits default 67108864] [--prompts 10]
                                            [--rounds 3] [--server-threads 1] [--quick]

``--quick``: a smoke run (``make bench-smoke``): both limits, 3 concurrent prompts, one round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import httpx
from bench_server import start_server
import psutil

MB = 1024 * 1024
SMALL = {"messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 8, "temperature": 0}


class Peak(threading.Thread):
    """Samples a process's RSS every 10 ms until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc, self.peak, self.done = psutil.Process(pid), 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def send_burst(url: str, n: int) -> tuple[list[int], list[str]]:
    """``n`` concurrent 5 MB chat prompts (in a child process); their statuses and error codes."""
    body = json.dumps({"messages": [{"role": "user", "content": "hello world " * (5 * MB // 12)}],
                       "max_tokens": 8}).encode()

    def one(_):
        r = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=300,
                       headers={"content-type": "application/json"})
        return r.status_code, (r.json()["error"]["code"] if r.status_code != 200 else "ok")

    with ThreadPoolExecutor(n) as pool:
        got = list(pool.map(one, range(n)))
    return sorted({s for s, _ in got}), sorted({c for _, c in got})


def probe(model: str, limit: str, n_prompts: int, threads: int, rounds: int) -> dict:
    proc, url = start_server(model, [] if limit == "default" else ["--max-body-bytes", limit], threads, timeout=120)
    try:
        with httpx.Client(timeout=300) as c:
            for _ in range(3):  # warm up: the first forwards allocate
                assert c.post(f"{url}/v1/chat/completions", json=SMALL).status_code == 200
        rss = psutil.Process(proc.pid)
        before = rss.memory_info().rss
        peak = Peak(proc.pid)
        peak.start()
        # the burst is sent from another process, so the client's own work does not slow the small requests
        # measured here; they are sent back to back (a chat and a /health loop) from the start of the burst to
        # its end, and at least five times each
        lat: dict[str, list[float]] = {"chat": [], "health": []}
        quiet = [timed(lambda: httpx.post(f"{url}/v1/chat/completions", json=SMALL, timeout=60)) for _ in range(10)]
        burst_done = threading.Event()

        def small(kind: str):
            with httpx.Client(timeout=300) as c:
                n0 = len(lat[kind])
                while not burst_done.is_set() or len(lat[kind]) < n0 + 3:
                    if kind == "chat":
                        lat[kind].append(timed(lambda: c.post(f"{url}/v1/chat/completions", json=SMALL)
                                               .raise_for_status()))
                    else:
                        lat[kind].append(timed(lambda: c.get(f"{url}/health").raise_for_status()))

        burst_s: list[float] = []
        statuses: set = set()
        codes: set = set()
        with ProcessPoolExecutor(1) as pool:
            pool.submit(time.sleep, 0).result()  # the child is started before any timing
            for _ in range(rounds):
                burst_done.clear()
                t0 = time.perf_counter()
                burst = pool.submit(send_burst, url, n_prompts)
                time.sleep(0.1)  # the burst is on its way
                probers = [threading.Thread(target=small, args=(k,)) for k in lat]
                for t in probers:
                    t.start()
                st, co = burst.result()
                burst_s.append(time.perf_counter() - t0)
                statuses.update(st)
                codes.update(co)
                burst_done.set()
                for t in probers:
                    t.join()
        peak.done.set()
        peak.join()
        time.sleep(1.0)
        after = rss.memory_info().rss

        def fifty(chunked: bool) -> str:
            payload = b'{"messages": [{"role": "user", "content": "' + b"x" * (50 * MB) + b'"}]}'
            content = (payload[i:i + MB] for i in range(0, len(payload), MB)) if chunked else payload
            try:
                r = httpx.post(f"{url}/v1/chat/completions", content=content, timeout=300)
                return f"{r.status_code} {r.json()['error']['code']}"
            except httpx.TransportError as e:
                return f"{type(e).__name__}: {e}"

        return {"limit": limit, "rss_before_mb": before / MB, "rss_peak_mb": peak.peak / MB, "rss_after_mb": after / MB,
                "growth_mb": (after - before) / MB, "peak_growth_mb": (peak.peak - before) / MB, "burst_s": max(burst_s),
                "statuses": sorted(statuses), "codes": sorted(codes), "rounds": rounds, "small_chat_max_s": max(lat["chat"]),
                "small_chat_median_s": statistics.median(lat["chat"]), "health_max_s": max(lat["health"]),
                "small_requests": len(lat["chat"]), "quiet_chat_s": statistics.median(quiet),
                "chat_p90_s": sorted(lat["chat"])[int(0.9 * (len(lat["chat"]) - 1))],
                "fifty_mb": fifty(False), "fifty_mb_chunked": fifty(True)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.stderr.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: build tiny-teacher in a temp folder)")
    ap.add_argument("--limits", nargs="+", default=["default", str(64 * MB)])
    ap.add_argument("--prompts", type=int, default=10, help="concurrent 5 MB prompts")
    ap.add_argument("--rounds", type=int, default=3, help="bursts per limit (RSS is read after the last)")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="the server's torch threads (OMP_NUM_THREADS; 0: torch's default). On a shared 2-core "
                         "machine two spinning threads make even a quiet 8-token answer 5-10x slower")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 concurrent prompts, one round per limit")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.rounds = 3, 1
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "tiny-teacher")
            subprocess.run([sys.executable, "-m", "lmdistill", "models", "build", "tiny-teacher", "--out", model],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"model {model}; {os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f}); {args.prompts} concurrent "
              f"5 MB prompts; server torch threads {args.server_threads or 'default'}")
        for limit in args.limits:
            r = probe(model, limit, args.prompts, args.server_threads, args.rounds)
            print(f"\nbody limit {r['limit']}:")
            print(f"  RSS {r['rss_before_mb']:.0f} MB -> peak {r['rss_peak_mb']:.0f} MB -> after {r['rss_after_mb']:.0f} MB"
                  f" (growth {r['growth_mb']:+.0f} MB, peak growth {r['peak_growth_mb']:+.0f} MB)")
            print(f"  burst ({r['rounds']} rounds): slowest {r['burst_s']:.2f} s, statuses {r['statuses']} {r['codes']}")
            print(f"  small chat during the bursts: max {r['small_chat_max_s']:.3f} s, p90 {r['chat_p90_s']:.3f} s, "
                  f"median {r['small_chat_median_s']:.3f} s over {r['small_requests']} (quiet: {r['quiet_chat_s']:.3f} s); "
                  f"/health max {r['health_max_s']:.3f} s")
            print(f"  50 MB body: {r['fifty_mb']}; chunked: {r['fifty_mb_chunked']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
