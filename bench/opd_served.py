"""On-policy distillation (``opd``) against GKD with a served teacher (issue 32, item 4): training tokens per second
and bytes on the wire per trained token, in the same run.

    .venv/bin/python bench/opd_served.py [--model smollm2|tiny] [--steps 10] [--batch 8] [--max-new-tokens 64]
                                         [--top-k 20] [--out runs/bench-opd-served] [--json FILE] [--quick]

One real ``lmdistill serve`` subprocess of the teacher (``--model smollm2``: SmolLM2-135M-Instruct, its 10-layer
pruning the student, ``bench_models.py``; ``tiny``: the random tiny pair) serves every run, one torch thread each
side. Each method trains ``--steps`` optimiser steps of ``--batch`` Dolly rows from the same student, in this process,
against ``teacher=openai:m@URL``: ``opd`` (the recipe: the student's samples at temperature 1, the server asked for
each sampled token's log-probability, ``echo`` with ``logprobs: 0``), ``gkd`` (the recipe: a coin per batch between
the student's samples at temperature 0.9 and the gold responses, the generalized JSD on the server's top ``--top-k``
per position, ``logprobs: K``), and ``gkd-onpolicy`` (``policy.student_prob=1``: every batch the student's samples,
so the sequences are of the same kind as opd's); ``opd-prompt-lp`` is opd asking with vLLM's ``prompt_logprobs: 0``
instead of ``echo``. Every method samples at most ``--max-new-tokens`` tokens.

Bytes are counted at the client, at the HTTP transport of the openai package (``httpx`` / ``httpx2``: request line,
headers and body; status line, headers and body of the answer, uncompressed: the server sends no compression).
Printed per method: trained tokens per second over steps 2..N (sampling, teacher requests, forward, backward and
update; step 1 warms up), the share of that time spent waiting on the server, bytes per trained token (requests and
answers over every step), and opd's ratios to each GKD run.

``--quick``: the tiny models, 2 steps of batch 2, 8 new tokens, opd and gkd only, in a temporary folder.
Ratios printed are the first method's (opd) to each other.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_models import models  # noqa: E402
from bench_server import start_server  # noqa: E402

from lmdistill.io import write_json  # noqa: E402
from lmdistill.train import Callback, load_config, train  # noqa: E402


class WireCounter:
    """Bytes and seconds of every HTTP exchange of this process, counted at the transport."""

    def __init__(self):
        self.sent = self.received = 0
        self.seconds = 0.0
        self.requests = 0
        for module in [httpx] + [importlib.import_module(m) for m in ("httpx2",) if importlib.util.find_spec(m)]:
            self._wrap(module.HTTPTransport)

    def _wrap(self, cls) -> None:
        original = cls.handle_request
        counter = self

        def handle_request(transport, request):
            t = time.perf_counter()
            response = original(transport, request)
            body = response.read()
            counter.seconds += time.perf_counter() - t
            counter.requests += 1
            head = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n"
            counter.sent += len(head) + _header_bytes(request.headers) + len(request.content or b"")
            status = f"HTTP/1.1 {response.status_code} OK\r\n"
            counter.received += len(status) + _header_bytes(response.headers) + len(body)
            return response

        cls.handle_request = handle_request

    def snapshot(self) -> tuple[int, int, float, int]:
        return self.sent, self.received, self.seconds, self.requests


def _header_bytes(headers) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2   # "Name: value\r\n" each, then the blank line


class StepTimes(Callback):
    def __init__(self, wire: WireCounter):
        self.wire, self.rows = wire, []

    def on_step_begin(self, run, step):
        self._t, self._w = time.perf_counter(), self.wire.snapshot()

    def on_step_end(self, run, step, metrics):
        sent, received, waited, requests = (a - b for a, b in zip(self.wire.snapshot(), self._w))
        self.rows.append({"step": step + 1, "seconds": time.perf_counter() - self._t, "tokens": metrics["tokens"],
                          "sent": sent, "received": received, "waited": waited, "requests": requests})


def run_method(name: str, recipe: str, extra: list[str], student: Path, url: str, out: Path, args,
               wire: WireCounter) -> dict:
    cfg = load_config(recipe, [f"student={student}", f"teacher=openai:m@{url}/v1", f"output_dir={out / name}",
                               f"max_steps={args.steps}", f"batch_size={args.batch}", f"micro_batch_size={args.batch}",
                               f"max_train_examples={args.steps * args.batch}", "valid_data=", "eval_steps=100000",
                               "save_steps=100000", "progress=false", "device=cpu", "max_length=256",
                               "max_prompt_length=192", f"sampling.max_new_tokens={args.max_new_tokens}",
                               f"teacher_top_k={args.top_k}", "lr=2e-4", *extra])
    times = StepTimes(wire)
    train(cfg, callbacks=[times], overwrite=True)
    timed = times.rows[1:] or times.rows       # step 1 warms up
    tokens, seconds = sum(r["tokens"] for r in timed), sum(r["seconds"] for r in timed)
    all_tokens = sum(r["tokens"] for r in times.rows)
    row = {"method": name, "steps": len(times.rows), "trained_tokens": all_tokens,
           "tokens_per_s": tokens / seconds, "median_step_s": statistics.median(r["seconds"] for r in timed),
           "server_wait_share": sum(r["waited"] for r in timed) / seconds,
           "requests": sum(r["requests"] for r in times.rows),
           "bytes_sent_per_token": sum(r["sent"] for r in times.rows) / all_tokens,
           "bytes_received_per_token": sum(r["received"] for r in times.rows) / all_tokens}
    row["bytes_per_token"] = row["bytes_sent_per_token"] + row["bytes_received_per_token"]
    print(f"  {name:<13} {row['tokens_per_s']:8.1f} tok/s  step {row['median_step_s']:6.2f} s  server wait "
          f"{100 * row['server_wait_share']:4.1f}%  {row['bytes_per_token']:9.1f} B/token (sent "
          f"{row['bytes_sent_per_token']:.1f}, received {row['bytes_received_per_token']:.1f}; "
          f"{row['requests']} requests, {all_tokens:.0f} tokens)", flush=True)
    return row


#: name, recipe, overrides: opd's two ways of asking, GKD as its recipe and with every batch the student's samples.
METHODS = [("opd", "opd", []), ("opd-prompt-lp", "opd", ["teacher_logprobs_api=prompt_logprobs"]),
           ("gkd", "gkd", []), ("gkd-onpolicy", "gkd", ["policy.student_prob=1.0"])]


def measure(args, teacher: Path, student: Path, out: Path) -> list[dict]:
    torch.set_num_threads(args.threads)
    wire = WireCounter()
    proc, url = start_server(str(teacher), ["--max-logprobs", str(args.top_k), "--max-batch-size", "16"],
                             args.threads)
    methods = [m for m in METHODS if m[0] in args.methods]
    print(f"teacher {teacher} served at {url}; student {student}; {args.steps} steps of {args.batch} rows, at most "
          f"{args.max_new_tokens} new tokens, GKD top-k {args.top_k}, {args.threads} torch thread(s) each side")
    try:
        rows = [run_method(name, recipe, extra, student, url, out, args, wire) for name, recipe, extra in methods]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()
    opd = rows[0]
    for other in rows[1:]:
        speed = opd["tokens_per_s"] / other["tokens_per_s"]
        wire = opd["bytes_per_token"] / other["bytes_per_token"]
        print(f"{opd['method']} / {other['method']}: tokens/s x{speed:.2f}, bytes per trained token x{wire:.3f} "
              f"({1 / wire:.1f} times fewer)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=20, help="GKD's teacher_top_k (vLLM's default --max-logprobs)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the trainer and of the server")
    ap.add_argument("--out", default="runs/bench-opd-served")
    ap.add_argument("--cache", default="runs/bench-models", help="where the models are built or converted once")
    ap.add_argument("--methods", nargs="+", default=[m[0] for m in METHODS], choices=[m[0] for m in METHODS],
                    help="the runs; ratios are printed of the first to each of the others")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny models, 2 steps of 2, 8 new tokens")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch, args.max_new_tokens, args.methods = 2, 2, 8, ["opd", "gkd"]
        with tempfile.TemporaryDirectory(prefix="bench-opd-") as tmp:
            teacher, student = models("tiny", Path(tmp) / "models")
            measure(args, teacher, student, Path(tmp) / "runs")
        return
    teacher, student = models(args.model, Path(args.cache))
    rows = measure(args, teacher, student, Path(args.out))
    if args.json:
        write_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
