"""Benchmark: generalized JSD (beta=0.5) loss + backward from the student's hidden states.

Every variant runs in its own subprocess and reports its peak resident memory (``ru_maxrss`` of
the child, which includes the inputs: hidden states and both LM heads) and its time per
forward+backward step (median over ``--iters`` after one warm-up step).  All variants get the same
seeded inputs: student hidden ``[B, T, H]`` and head ``[V, H]`` (both trained), teacher hidden and
head (frozen).  The variants:

* ``ours-chunked``: ``chunked_divergence("jsd", h, W, teacher_hidden=..., teacher_head_weight=...)``
* ``ours-chunked-compiled``: the same with ``compile=True`` (the per-chunk kernel through ``torch.compile``)
* ``ours-chunked-tlogits``: the same, given the full teacher logits (as a cached-logits trainer would)
* ``ours-direct``: ``jsd(h @ W.T, teacher_logits)``
* ``trl``: TRL's ``GKDTrainer.generalized_jsd_loss(h @ W.T, teacher_logits, labels)``
* ``liger``: Liger-Kernel's ``chunked_loss.LigerFusedLinearJSDLoss`` (pure PyTorch, torch.compile'd),
  with weight_hard_loss=0 so it computes the same JSD
* ``liger-triton``: Liger-Kernel's Triton kernel ``transformers.LigerFusedLinearJSD`` (``jsd_beta=0.5``); it needs
  CUDA and ``triton`` and is not in the default variants (``gpu_check.py`` runs it)

``--device cuda --dtype bfloat16`` runs the same variants on a GPU (inputs in that dtype); the memory columns are then
``torch.cuda.max_memory_allocated`` (peak) and the peak minus what the inputs hold (growth) instead of RSS.

Usage:
    python bench/losses.py                # vocab 32000, 128256, 152064; 2 x 1024 tokens; hidden 896
    python bench/losses.py --quick        # smoke run: vocab 8000, 2 x 128 tokens, one thread (make bench-smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from lmdistill.losses import chunked_divergence, jsd

VARIANTS = ["trl", "ours-chunked", "ours-chunked-compiled", "ours-chunked-tlogits", "ours-direct", "liger"]
EXTRA_VARIANTS = ["liger-triton"]


def _inputs(args):
    g = torch.Generator().manual_seed(0)
    b, t, h, v = args.batch, args.seq, args.hidden, args.vocab
    put = dict(device=args.device, dtype=getattr(torch, args.dtype))  # drawn in float32 on the CPU, then moved
    hs = torch.randn(b, t, h, generator=g).to(**put).requires_grad_(True)
    ws = (torch.randn(v, h, generator=g) * 0.05).to(**put).requires_grad_(True)
    ht = torch.randn(b, t, h, generator=g).to(**put)
    wt = (torch.randn(v, h, generator=g) * 0.05).to(**put)
    labels = torch.randint(0, v, (b, t), generator=g).to(args.device)
    return hs, ws, ht, wt, labels


def _step_fn(variant, args):
    hs, ws, ht, wt, labels = _inputs(args)
    beta = 0.5
    if variant == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        def step():
            with torch.no_grad():
                t_logits = ht @ wt.T
            return GKDTrainer.generalized_jsd_loss(hs @ ws.T, t_logits, labels=labels, beta=beta)
    elif variant == "ours-direct":
        def step():
            with torch.no_grad():
                t_logits = ht @ wt.T
            return jsd(hs @ ws.T, t_logits, beta=beta)
    elif variant == "ours-chunked":
        def step():
            return chunked_divergence("jsd", hs, ws, teacher_hidden=ht, teacher_head_weight=wt, beta=beta,
                                      chunk_size=args.chunk_size)
    elif variant == "ours-chunked-compiled":
        def step():
            return chunked_divergence("jsd", hs, ws, teacher_hidden=ht, teacher_head_weight=wt, beta=beta,
                                      chunk_size=args.chunk_size, compile=True)
    elif variant == "ours-chunked-tlogits":
        def step():
            with torch.no_grad():
                t_logits = ht @ wt.T
            return chunked_divergence("jsd", hs, ws, t_logits, beta=beta, chunk_size=args.chunk_size)
    elif variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=True)
        h_flat, t_flat, lab = hs.reshape(-1, args.hidden), ht.reshape(-1, args.hidden), labels.reshape(-1)

        def step():
            return fn(h_flat, ws, t_flat, wt, lab)
    elif variant == "liger-triton":
        if args.device != "cuda":
            raise SystemExit("liger-triton needs CUDA (a Triton kernel)")
        from liger_kernel.transformers import LigerFusedLinearJSD

        fn = LigerFusedLinearJSD(jsd_beta=beta)
        h_flat, t_flat = hs.reshape(-1, args.hidden), ht.reshape(-1, args.hidden)

        def step():
            return fn(h_flat, ws, t_flat, wt)
    else:
        raise SystemExit(f"unknown variant {variant}")
    return step, (hs, ws)


def _sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def _memory_mb(args, peak: bool) -> float:
    """Peak (or current) CUDA allocation on a GPU, the peak RSS on the CPU (``ru_maxrss``: KiB on Linux)."""
    if args.device == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args):
    torch.set_num_threads(args.threads)
    step, params = _step_fn(args.child, args)
    base_mb = _memory_mb(args, peak=False)  # imports + inputs, before any step
    if args.child in ("liger", "liger-triton", "ours-chunked-compiled"):  # compile/JIT on the first call: not timed
        args.warmup = max(args.warmup, 1)
    times, value = [], None
    for i in range(args.iters + args.warmup):
        for p in params:
            p.grad = None
        _sync(args)
        t0 = time.perf_counter()
        loss = step()
        loss.backward()
        _sync(args)
        dt = time.perf_counter() - t0
        value = float(loss)
        if i >= args.warmup:
            times.append(dt)
    rss_mb = _memory_mb(args, peak=True)  # before the parity check
    # gradient norm in float64 over 4096-row slices (a whole float64 copy of a 152k head would be 1 GiB)
    parts = (part for p in params for part in p.grad.reshape(-1, p.shape[-1]).split(4096))
    gnorm = sum(float(part.double().pow(2).sum()) for part in parts) ** 0.5
    print(json.dumps({"time_s": statistics.median(times), "rss_mb": rss_mb, "net_mb": rss_mb - base_mb,
                      "loss": value, "grad_norm": gnorm}))


def run_variant(variant, vocab, args, timeout=None):
    """One variant in its own process: ``{time_s, rss_mb, net_mb, loss, grad_norm}`` or ``{error}``."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--vocab", str(vocab),
           "--batch", str(args.batch), "--seq", str(args.seq), "--hidden", str(args.hidden),
           "--iters", str(args.iters), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--device", args.device, "--dtype", args.dtype]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = [l for l in (proc.stderr or proc.stdout).strip().splitlines() if l.strip()]
        return {"error": lines[-1][:160] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: vocab 8000, 2 x 128 tokens, 1 iteration")
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256, 152064])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--iters", type=int, default=1, help="timed steps per variant (median is reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=torch_threads_default())
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS + EXTRA_VARIANTS)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.variants = list(dict.fromkeys(args.variants))
    if args.child:
        return child(args)
    if args.quick:
        args.vocabs, args.seq, args.threads = [8000], 128, 1

    print(f"# JSD(beta=0.5) loss + backward, {args.batch} x {args.seq} tokens, hidden {args.hidden}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print()
    print("| vocab | variant | time / step (s) | peak RSS (MiB) | RSS growth in step (MiB) | time vs TRL "
          "| peak RSS vs TRL | growth vs TRL | loss | grad norm | status |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for vocab in args.vocabs:
        results = {v: run_variant(v, vocab, args) for v in args.variants}
        ref = results.get("trl", {})
        for v in args.variants:
            r = results[v]
            if "error" in r:
                print(f"| {vocab} | {v} | - | - | - | - | - | - | - | - | did not run: {r['error']} |", flush=True)
                continue
            tr = f"{r['time_s'] / ref['time_s']:.2f}x" if "time_s" in ref else "-"
            mr = f"{r['rss_mb'] / ref['rss_mb']:.2f}x" if "rss_mb" in ref else "-"
            nr = f"{r['net_mb'] / ref['net_mb']:.2f}x" if ref.get("net_mb") else "-"
            print(f"| {vocab} | {v} | {r['time_s']:.2f} | {r['rss_mb']:.0f} | {r['net_mb']:.0f} | {tr} | {mr} | {nr} "
                  f"| {r['loss']:.6f} | {r['grad_norm']:.6g} | ok |", flush=True)


def torch_threads_default():
    return int(os.environ.get("BENCH_THREADS", min(os.cpu_count() or 1, 2)))


if __name__ == "__main__":
    main()
