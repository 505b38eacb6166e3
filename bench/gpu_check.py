"""GPU check (issue 34): bf16 throughput and memory of lmdistill against TRL and Liger on real-size shapes, one run.

    python bench/gpu_check.py [--out DIR] [--budget 420] [--parts kd,gkd,losses,decoder,precision]
    python bench/gpu_check.py --cpu-smoke [--out DIR]          # the same parts on tiny shapes, float32 (CPU)

Meant for the lent GPU machine (``bench/gpu_check.sh`` installs the carried wheels and runs this on that machine's own
Python with ``PYTHONPATH=src``). Models are built from their configs with random weights (no weights can travel):
SmolLM2-135M (student) / SmolLM2-360M (teacher), vocabulary 49,152 both; Qwen2.5-0.5B (student, 151,936) /
Qwen2.5-1.5B-shaped (teacher, 152,064 rows as Qwen2.5 7B pads them), with lmdistill's 4,096-token tokenizer (the
rows above it are never produced by the tokenizer, only sampled by the random models). Parts, in the order
kd, gkd, decoder + precision, losses, each time-boxed (``--budget`` seconds in all, and ``CAPS`` per process; a part
that would not fit is skipped and says so):

- ``kd`` (both pairs; the smoke run: the Qwen2-family pair only): ``lmdistill train kd`` (forward KL, chunked loss)
  against TRL ``GKDTrainer`` with ``lmbda=0, beta=0`` (forward KL on the gold responses), same rows, optimiser and
  precision (``bench_trainers.py``): trained tokens/s, computed positions/s, peak ``torch.cuda.max_memory_allocated``;
  MFU = positions/s x (6 N_student + 2 N_teacher) FLOPs / the device's dense bf16 peak (N: parameters that multiply,
  the tied head counted once; attention's own FLOPs left out), for both trainers.
- ``gkd``: ``lmdistill train gkd`` (on-policy samples from the fast decoder, chunked loss) against ``GKDTrainer``
  (HF ``generate``) with ``lmbda=1``: every step samples, so a short run has no coin noise. JSD beta 0.5.
- ``losses``: the chunked JSD (``bench/losses.py`` variants ``ours-chunked``, ``liger`` = Liger's torch.compile'd
  ``LigerFusedLinearJSDLoss``, ``liger-triton`` = its Triton ``LigerFusedLinearJSD``, ``trl``) at vocabulary
  152,064, hidden 896: time per loss + backward and peak memory, ratios to Liger's Triton kernel.
- ``decoder``: our student policy (the fast decoder) against HF ``generate`` on the same bf16 student, same prompts
  and length, no EOS: milliseconds per decode step and the ratio (``bench/generation.py``'s ``hf_generate``).
- ``precision``: the trainer's loss terms (``fkl``, ``jsd``; chunked) and TRL's ``generalized_jsd_loss`` on one
  batch, bf16 (autocast, teacher in bfloat16, as the bf16 runs train) against float32 on the same weights: relative
  loss difference (tolerance 1e-2) and the cosine between the student gradients (tolerance >= 0.99).

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out`` (default ``$OUT``, else ``runs/gpu_check``). Exit 1 if a
part failed (skipped parts do not count). ``--cpu-smoke``: float32 on the CPU, tiny models of the same families
(Llama and Qwen2 pairs, the Qwen pair's vocabularies 128 rows apart), a few steps; ``liger-triton`` is skipped (it
needs CUDA and Triton) and MFU has no peak to divide by; ``make bench-smoke`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import losses as loss_bench  # noqa: E402
from bench_gpu_report import markdown  # noqa: E402
from bench_trainers import add_worker_args, run_worker  # noqa: E402

from lmdistill.io import write_json, write_text  # noqa: E402

#: Config fields of the real shapes (from the models' config.json files on the hub).
SMOL = dict(model_type="llama", vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)
QWEN = dict(model_type="qwen2", rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768)
REAL = {
    "smollm2": {"student": dict(SMOL, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3),
                "teacher": dict(SMOL, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                num_attention_heads=15, num_key_value_heads=5)},
    "qwen2.5": {"student": dict(QWEN, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2),
                "teacher": dict(QWEN, vocab_size=152064, hidden_size=1536, intermediate_size=8960,
                                num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2)},
}
TINY = {
    "smollm2": {"student": dict(SMOL, vocab_size=4608, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2),
                "teacher": dict(SMOL, vocab_size=4608, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                                num_attention_heads=6, num_key_value_heads=2)},
    "qwen2.5": {"student": dict(QWEN, vocab_size=4608, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2),
                "teacher": dict(QWEN, vocab_size=4736, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                                num_attention_heads=6, num_key_value_heads=2)},
}
#: What each mode runs: trainer (warm-up, measured) steps, batch, lengths, the loss benchmark's shape, the decoder's
#: (batch, new tokens, repeats). Liger's compiled loss runs last: its torch.compile is the slowest start.
GPU = dict(device="cuda", precision="bf16", batch=16, new_tokens=128, kd=(1, 8), gkd=(1, 3), train_examples=1000,
           loss=dict(vocab=152064, hidden=896, batch=4, seq=1024, iters=3), decode=(16, 128, 3), rows=8,
           variants=["ours-chunked", "liger-triton", "trl", "liger"], trainer_pairs=("smollm2", "qwen2.5"))
SMOKE = dict(device="cpu", precision="fp32", batch=4, new_tokens=8, kd=(1, 2), gkd=(1, 2), train_examples=64,
             loss=dict(vocab=4736, hidden=64, batch=2, seq=64, iters=1), decode=(4, 8, 1), rows=4,
             variants=["ours-chunked", "liger-triton", "trl"], trainer_pairs=("qwen2.5",))
#: Dense bf16 peak (FLOP/s) by device name, for MFU (H100 SXM and H200: 989 TFLOP/s without sparsity).
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
PARTS = ("kd", "gkd", "losses", "decoder", "precision")
CHILD_PARTS = ("decoder", "precision")   # in one child process (bench_gpu_parts.py), after kd and gkd, before losses
#: The most seconds one trainer worker, one loss variant and the child may take (within what is left of the budget).
CAPS = {"worker": 150, "variant": 90, "child": 150}


def device_peak(name: str) -> float | None:
    return next((v for k, v in PEAKS.items() if k in name), None)


# ---------------------------------------------------------------------------------------------- models
def build_pair(root: Path, shapes: dict, device: str, dtype: torch.dtype, tokenizer) -> dict:
    """Random-weight student and teacher from config fields, saved under ``root``; their sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    info = {}
    for seed, role in enumerate(("student", "teacher")):
        fields = dict(shapes[role])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields, tie_word_embeddings=True,
                                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id,
                                                   eos_token_id=tokenizer.eos_token_id,
                                                   bos_token_id=tokenizer.bos_token_id)
        model.save_pretrained(str(root / role))
        tokenizer.save_pretrained(str(root / role))
        # parameters that multiply: all of them with a tied head (the embedding table is the head's matrix)
        info[role] = {"params": sum(p.numel() for p in model.parameters()), "vocab": config.vocab_size,
                      "layers": config.num_hidden_layers, "hidden": config.hidden_size}
        del model
    return info


def build_models(work: Path, shapes: dict, mode: dict) -> dict:
    from lmdistill.models import build_tokenizer

    tok = build_tokenizer()
    dtype = torch.bfloat16 if mode["precision"] == "bf16" else torch.float32
    pairs = {name: build_pair(work / name, s, mode["device"], dtype, tok) for name, s in shapes.items()}
    if mode["device"] == "cuda":
        torch.cuda.empty_cache()
    return pairs


# ---------------------------------------------------------------------------------------------- parts
def left(deadline: float) -> float:
    return deadline - time.monotonic()


def part_trainers(recipe: str, work: Path, pairs: dict, mode: dict, deadline: float) -> list[dict]:
    """Ours and TRL on each pair (``bench_trainers.py``), each worker time-boxed by what is left."""
    p = argparse.ArgumentParser()
    add_worker_args(p)
    warmup, steps = mode[recipe]
    rows = []
    for pair in mode["trainer_pairs"]:
        args = p.parse_args([])
        args.__dict__.update(root=work / pair, recipe=recipe, device=mode["device"], precision=mode["precision"],
                             batch=mode["batch"], new_tokens=mode["new_tokens"], warmup=warmup, steps=steps,
                             lmbda=1.0, chunked_loss=True, threads=os.cpu_count() if mode["device"] == "cuda" else 1,
                             train_examples=mode["train_examples"])
        for name in ("ours", "trl"):
            row = {"pair": pair, "recipe": recipe, "trainer": name, "steps": steps, "warmup": warmup}
            if left(deadline) < 30:
                rows.append({**row, "status": "skipped: the time budget is spent"})
                continue
            try:
                run = run_worker(name, args, work / pair / f"{recipe}-{name}.json",
                                 timeout=min(left(deadline), CAPS["worker"]))
            except RuntimeError as e:
                rows.append({**row, "status": f"failed: {e}"})
                continue
            s = run["summary"]
            rows.append({**row, "status": "ok", "tokens_per_s": s["tokens_per_s"], "s_per_step": s["s_per_step"],
                         "positions_per_s": s["positions_per_s"], "peak_bytes": run["peak_bytes"],
                         "memory": run["memory"], "process_s": run["process_seconds"],
                         "on_policy_steps": s.get("on_policy_steps"), "first_loss": run["records"][0].get("loss")})
    return rows


def add_mfu(rows: list[dict], pairs: dict, peak: float | None) -> None:
    for r in rows:
        if r.get("status") == "ok":
            flops = 6 * pairs[r["pair"]]["student"]["params"] + 2 * pairs[r["pair"]]["teacher"]["params"]
            r["tflops"] = r["positions_per_s"] * flops / 1e12
            r["mfu"] = r["tflops"] * 1e12 / peak if peak else None


def part_losses(mode: dict, deadline: float) -> list[dict]:
    shape = mode["loss"]
    args = SimpleNamespace(**{k: v for k, v in shape.items() if k != "vocab"}, warmup=1, chunk_size=None,
                           threads=os.cpu_count() if mode["device"] == "cuda" else 1, device=mode["device"],
                           dtype="bfloat16" if mode["precision"] == "bf16" else "float32")
    rows = []
    for variant in mode["variants"]:
        row = {"variant": variant, "vocab": shape["vocab"], "tokens": shape["batch"] * shape["seq"]}
        if variant == "liger-triton" and mode["device"] != "cuda":
            rows.append({**row, "status": "skipped: Liger's Triton kernel needs CUDA and triton"})
            continue
        if left(deadline) < 20:
            rows.append({**row, "status": "skipped: the time budget is spent"})
            continue
        r = loss_bench.run_variant(variant, shape["vocab"], args, timeout=min(left(deadline), CAPS["variant"]))
        rows.append({**row, **r, "status": f"failed: {r['error']}" if "error" in r else "ok"})
    return rows


def part_child(parts: list[str], work: Path, pairs: dict, mode: dict, deadline: float) -> dict[str, list[dict]]:
    """``decoder`` and/or ``precision`` (``bench_gpu_parts.py``) in one child process, time-boxed."""
    def every(status: str) -> dict[str, list[dict]]:
        return {p: [{"status": status}] for p in parts}

    if left(deadline) < 20:
        return every("skipped: the time budget is spent")
    settings = {"parts": parts, "work": str(work), "pairs": list(pairs), **{k: mode[k] for k in
                ("device", "precision", "decode", "rows")}}
    cmd = [sys.executable, str(HERE / "bench_gpu_parts.py"), json.dumps(settings)]
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(left(deadline), CAPS["child"]),
                              env=env)
    except subprocess.TimeoutExpired:
        return every("failed: did not finish within the time budget")
    if proc.returncode:
        tail = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        sys.stderr.write(proc.stderr[-4000:])
        return every(f"failed: {tail[-1][:300] if tail else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- report
def done(part: str, rows: list[dict], t: float) -> None:
    print(f"gpu_check: {part} done ({time.monotonic() - t:.0f} s; {sum(r.get('status') == 'ok' for r in rows)} of "
          f"{len(rows)} rows ran)", flush=True)


def environment(mode: dict) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(0) if mode["device"] == "cuda" else platform.processor() or "CPU",
           "cuda": torch.version.cuda, "load": os.getloadavg()[0]}
    for name in ("trl", "liger-kernel", "triton", "datasets"):
        try:
            env[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:   # reported; the parts that need it fail and say why
            env[name.replace("-", "_")] = "missing"
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, float32 on the CPU (make bench-smoke)")
    ap.add_argument("--quick", action="store_true", help="the same as --cpu-smoke (every bench script has --quick)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu_check"))
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all parts, each time-boxed by what is left (default 420; smoke 900)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device, for MFU")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke or args.quick
    mode, shapes = (SMOKE, TINY) if smoke else (GPU, REAL)
    if not smoke and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}); run --cpu-smoke on a CPU", file=sys.stderr)
        return 2
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    t0 = time.monotonic()
    deadline = t0 + (args.budget or (900 if smoke else 420))
    env = environment(mode)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (device_peak(env["device"]) if not smoke else None)
    print(f"gpu_check: {env['device']}, torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}, "
          f"liger {env['liger_kernel']}; budget {left(deadline):.0f} s", flush=True)
    results = {"mode": "cpu-smoke" if smoke else "gpu", "environment": env, "settings": mode, "peak_flops": peak}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        results["models"] = build_models(work, shapes, mode)
        print(f"gpu_check: models built ({time.monotonic() - t0:.0f} s)", flush=True)
        for part in [p for p in ("kd", "gkd") if p in parts]:
            t = time.monotonic()
            results[part] = part_trainers(part, work, results["models"], mode, deadline)
            add_mfu(results[part], results["models"], peak)
            done(part, results[part], t)
        child = [p for p in parts if p in CHILD_PARTS]
        if child:
            t = time.monotonic()
            results.update(part_child(child, work, results["models"], mode, deadline))
            for part in child:
                done(part, results[part], t)
        if "losses" in parts:
            t = time.monotonic()
            results["losses"] = part_losses(mode, deadline)
            done("losses", results["losses"], t)
    results["seconds"] = time.monotonic() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "gpu_check.json", results)
    text = markdown(results)
    write_text(args.out / "gpu_check.md", text)
    print(text)
    failed = [(p, r["status"]) for p in parts for r in results[p] if r.get("status", "").startswith("failed")]
    for p, status in failed:
        print(f"gpu_check: {p}: {status}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
