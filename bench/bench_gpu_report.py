"""The markdown report of ``gpu_check.py`` (not a benchmark itself): a table per part, ratios as ours / theirs."""

from __future__ import annotations

GIB = 2 ** 30


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def _others(rows: list[dict], cols: int) -> list[str]:
    """Rows that did not run, with their reason, spanning the table."""
    return [f"| {r.get('pair', r.get('variant', ''))} {r.get('trainer', '')} | {r['status']} |"
            + " |" * (cols - 2) for r in rows if r.get("status") != "ok"]


def trainers(rows: list[dict], recipe: str) -> list[str]:
    what = {"kd": "KD: forward KL on gold responses (ours chunked; TRL lmbda=0, beta=0)",
            "gkd": "GKD: every step on-policy (ours: fast decoder, chunked JSD; TRL: HF generate, lmbda=1), "
                   "JSD beta 0.5"}
    out = [f"### {what[recipe]}", "",
           "| pair | trainer | s/step | trained tokens/s | positions/s | peak memory (GiB) | model TFLOP/s | MFU "
           "| ours / TRL tokens/s | ours / TRL memory |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in _ok(rows):
        base = next((b for b in _ok(rows) if b["pair"] == r["pair"] and b["trainer"] == "trl"), None)
        ratio = (f"**{r['tokens_per_s'] / base['tokens_per_s']:.2f}x** | "
                 f"**{r['peak_bytes'] / base['peak_bytes']:.2f}x**" if base else "- | -")
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        out.append(f"| {r['pair']} | {r['trainer']} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | "
                   f"{r['positions_per_s']:.0f} | {r['peak_bytes'] / GIB:.2f} | {r.get('tflops', 0):.3g} | {mfu} | "
                   f"{ratio} |")
    return out + _others(rows, 10) + [""]


def losses(rows: list[dict]) -> list[str]:
    ok = {r["variant"]: r for r in _ok(rows)}
    base_name = next((n for n in ("liger-triton", "liger", "trl") if n in ok), "liger")   # the first that ran
    base = ok.get(base_name)
    head = rows[0] if rows else {}
    out = [f"### Chunked JSD vs Liger: vocab {head.get('vocab')}, {head.get('tokens')} tokens, loss + backward", "",
           f"| variant | ms / step | peak memory (GiB) | growth in step (GiB) | loss | grad norm | time vs {base_name} "
           f"| peak vs {base_name} |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v, r in ok.items():
        rel = (f"{r['time_s'] / base['time_s']:.2f}x | {r['rss_mb'] / base['rss_mb']:.2f}x" if base else "- | -")
        out.append(f"| {v} | {1e3 * r['time_s']:.1f} | {r['rss_mb'] / 1024:.2f} | {r['net_mb'] / 1024:.2f} | "
                   f"{r['loss']:.6f} | {r['grad_norm']:.6g} | {rel} |")
    return out + _others(rows, 8) + [""]


def decoder(rows: list[dict]) -> list[str]:
    out = ["### Fast decoder vs HF generate (student, no EOS)", "",
           "| pair | batch | new tokens | dtype | ours ms/step | HF generate ms/step | **ours / HF** | fast decoder |",
           "|---|---:|---:|---|---:|---:|---:|---|"]
    for r in _ok(rows):
        out.append(f"| {r['pair']} | {r['batch']} | {r['new_tokens']} | {r['dtype']} | {r['ours_ms_per_step']:.2f} | "
                   f"{r['hf_ms_per_step']:.2f} | **{r['ours_over_hf']:.2f}x** | {r['fast_decoder']} |")
    return out + _others(rows, 8) + [""]


def precision(rows: list[dict]) -> list[str]:
    out = ["### bf16 against float32, one batch (tolerance: relative loss difference <= 1e-2, gradient cosine >= 0.99)",
           "", "| pair | loss | tokens | float32 | bf16 | relative difference | gradient cosine | within |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in _ok(rows):
        out.append(f"| {r['pair']} | {r['loss']} | {r['tokens']} | {r['fp32']:.6f} | {r['bf16']:.6f} | "
                   f"{r['rel_diff']:.2e} | {r['grad_cosine']:.5f} | {'yes' if r['within_tolerance'] else '**no**'} |")
    return out + _others(rows, 8) + [""]


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# gpu_check ({results['mode']})", "",
             f"{env['device']}; Python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), transformers "
             f"{env['transformers']}, trl {env['trl']}, liger-kernel {env['liger_kernel']}, triton {env['triton']}, "
             f"datasets {env['datasets']}; {results['seconds']:.0f} s in all. Peak for MFU: "
             + (f"{results['peak_flops'] / 1e12:.0f} TFLOP/s (dense bf16)" if results.get("peak_flops") else "none"),
             "", "| pair | role | parameters | vocabulary | layers | hidden |", "|---|---|---:|---:|---:|---:|"]
    for pair, roles in results["models"].items():
        for role, m in roles.items():
            lines.append(f"| {pair} | {role} | {m['params'] / 1e6:.1f}M | {m['vocab']} | {m['layers']} | "
                         f"{m['hidden']} |")
    lines.append("")
    for part, fn in (("kd", lambda r: trainers(r, "kd")), ("gkd", lambda r: trainers(r, "gkd")), ("losses", losses),
                     ("decoder", decoder), ("precision", precision)):
        if part in results:
            lines += fn(results[part])
    return "\n".join(lines) + "\n"
