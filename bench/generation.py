"""Benchmark the sequence engine on the tiny models (random weights, full-length generation).

    .venv/bin/python bench/generation.py [--batch 8] [--new-tokens 128 256] [--repeats 3] [--out FILE.md]
        [--draft-tokens 4 8] [--tau0-quantile 0.5] [--switch-only]

Rows (all sampling at temperature 1, batch ``--batch``, every row runs the full length):
- ``switch``: our SWITCH loop (student + teacher, one cached step each per token, ``draft_tokens=0``;
  ``tau0`` the ``--tau0-quantile`` of a student-only probe's JSDs, so both models contribute tokens).
- ``speculative switch, k <= K``: the same rule with speculative verification (``generation/speculative.py``,
  ``draft_tokens=K`` for each ``--draft-tokens``): the student drafts, the teacher checks a draft in one
  forward. Reported with both models' forward passes per generated token and how often its float32 output equals
  ``switch``'s (the multi-token forward rounds differently; identical in float64, tests/test_switch_speculative.py).
- ``naive switch``: the same decisions, but both models re-run over the whole prefix at every step (no cache).
- ``floor``: one HF ``model.generate`` of the student plus one of the teacher, same length.
- ``scrg``: student sampling, one teacher forward, one correction, suffix re-generation.
- ``student``: our student policy; ``HF student generate``: ``model.generate`` of the student.
- ``..., hf decoder``: the same policy with ``decoder="hf"`` (``model(...)`` + ``DynamicCache`` instead of
  the fast decoder), to show what the decoder buys and what the algorithm does.
- ``teacher scoring forward``: one teacher forward over prompt + response (what SCRG's scoring costs).
Times are the minimum over ``--repeats`` interleaved runs (the naive one runs once), wall time or with ``--clock cpu``
the process's CPU time. ``--switch-only``: only the
switch loops and the floor (the second table is left out). ``--quick``: every row (the naive loop too) at batch 4,
16 new tokens, one repeat, one thread: a smoke run (``make bench-smoke``), its figures mean nothing.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from lmdistill.data import load_examples
from lmdistill.generation import SamplingConfig, generate
from lmdistill.generation.engine import pad_left
from lmdistill.generation.noise import NoiseSource, keys_from_seed
from lmdistill.generation.policies.scrg import ScrgParams
from lmdistill.generation.policies.switch import SwitchParams
from lmdistill.generation.runner import CachedLM
from lmdistill.generation.sampling import pick
from lmdistill.losses import per_token_divergence
from lmdistill.models import build_model, build_tokenizer, load_model


def load_models(root: Path):
    tok = build_tokenizer()
    build_model("tiny-student", root / "student", tokenizer=tok, seed=0)
    build_model("tiny-teacher", root / "teacher", tokenizer=tok, seed=1)
    return load_model(str(root / "student")), load_model(str(root / "teacher")), tok


def bench_prompts(tok, batch: int, max_len: int = 48) -> list[list[int]]:
    out = []
    for ex in load_examples("dolly").examples:
        ids = tok(ex.instruction, add_special_tokens=False)["input_ids"]
        if 8 <= len(ids) <= max_len:
            out.append(ids)
        if len(out) == batch:
            return out
    raise RuntimeError("not enough short prompts")


def naive_switch(student, teacher, prompts, config: SamplingConfig, params: SwitchParams, pad_id: int) -> torch.Tensor:
    """SWITCH without caches: both models run over prompt + everything so far at every step."""
    ids, mask = pad_left(prompts, pad_id)
    noise = NoiseSource(keys_from_seed(len(prompts), config.seed), student.config.vocab_size)
    for t in range(config.max_new_tokens):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        q = student(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
        p = teacher(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
        d = per_token_divergence("jsd", q, p, beta=0.5)
        g = noise.gumbel(t)
        nxt = torch.where(d > params.threshold(t), pick(p, config, g), pick(q, config, g))
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def hf_generate(model, prompts, n: int, pad_id: int, seed: int):
    ids, mask = (x.to(model.device) for x in pad_left(prompts, pad_id))
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=n, min_new_tokens=n, pad_token_id=pad_id)
    assert out.shape[1] == ids.shape[1] + n
    return out


def forwards(out) -> dict:
    """Each model's forward passes per generated token (a batch's pass counts once per row it computes)."""
    tokens = sum(s["length"] for s in out.stats)
    return {m: sum(s[f"{m}_forwards"] for s in out.stats) / tokens for m in ("teacher", "student")}


def agreement(a, b) -> str:
    """How often two runs wrote the same response: rows identical, and the share of positions before rows differ."""
    same = sum(x == y for x, y in zip(a.responses, b.responses))
    prefix = 0
    for x, y in zip(a.responses, b.responses):
        prefix += next((i for i, (u, w) in enumerate(zip(x, y)) if u != w), min(len(x), len(y)))
    return f"{same}/{len(a.responses)} ({prefix / sum(map(len, a.responses)):.0%} of positions before a difference)"


CLOCK = time.perf_counter  # --clock cpu: time.process_time, this process's CPU time (steadier on a shared machine)


def timed(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--switch-tau0", "--tau0", dest="switch_tau0", type=float, default=None,
                    help="switch threshold (default: about half teacher tokens)")
    ap.add_argument("--tau0-quantile", type=float, default=0.5,
                    help="default switch tau0: this quantile of the probe's JSDs (higher: fewer teacher tokens)")
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[4],
                    help="speculative switch: draft_tokens values to measure")
    ap.add_argument("--switch-only", action="store_true", help="only the switch loops and the floor")
    ap.add_argument("--no-naive", action="store_true", help="skip the (slow) naive switch")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time the process's CPU time (all its threads) instead of wall time")
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run of every row: batch 4, 16 new tokens, draft 4, one repeat, one thread")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.new_tokens, args.draft_tokens, args.repeats, args.threads = 4, [16], [4], 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory() as tmp:
        student, teacher, tok = load_models(Path(tmp))
    prompts = bench_prompts(tok, args.batch)
    pad = tok.pad_token_id
    kw = dict(pad_id=pad, eos_id=None)  # no EOS: every row generates the full length

    switch_tau0 = args.switch_tau0
    if switch_tau0 is None:  # median JSD of a short student-only probe: both models then contribute tokens
        probe = generate(student, prompts, "switch", teacher=teacher, config=SamplingConfig(max_new_tokens=32, seed=0),
                         params=SwitchParams(tau0=math.inf, draft_tokens=0), **kw)
        values = sorted(v for s in probe.stats for v in s["jsd"])
        i = min(int(args.tau0_quantile * len(values)), len(values) - 2)
        switch_tau0 = (values[i] + values[i + 1]) / 2  # between two observed JSDs: no exact ties with the probe's

    rows = []
    for n in args.new_tokens:
        cfg = SamplingConfig(max_new_tokens=n, seed=0)
        sw, sc = SwitchParams(tau0=switch_tau0, decay=0.0, draft_tokens=0), ScrgParams(rounds=1)
        cfg_hf = replace(cfg, decoder="hf")
        spec_params = {k: replace(sw, draft_tokens=k) for k in args.draft_tokens}
        sw_out = generate(student, prompts, "switch", teacher=teacher, config=cfg, params=sw, **kw)  # also warms up
        spec_out = {k: generate(student, prompts, "switch", teacher=teacher, config=cfg, params=p, **kw)
                    for k, p in spec_params.items()}
        variants = {
            "switch": lambda: generate(student, prompts, "switch", teacher=teacher, config=cfg, params=sw, **kw),
            "hf_s": lambda: hf_generate(student, prompts, n, pad, 0),
            "hf_t": lambda: hf_generate(teacher, prompts, n, pad, 0),
        }
        for k, p in spec_params.items():
            variants[f"spec{k}"] = lambda p=p: generate(student, prompts, "switch", teacher=teacher, config=cfg,
                                                        params=p, **kw)
        if not args.switch_only:
            sc_out = generate(student, prompts, "scrg", teacher=teacher, config=cfg, params=sc, **kw)
            scored = sc_out.input_ids[:, sc_out.prompt_width:]
            ids, mask = pad_left(prompts, pad)
            variants.update({
                "student": lambda: generate(student, prompts, "student", config=cfg, **kw),
                "scrg": lambda: generate(student, prompts, "scrg", teacher=teacher, config=cfg, params=sc, **kw),
                "switch_hf": lambda: generate(student, prompts, "switch", teacher=teacher, config=cfg_hf, params=sw,
                                              **kw),
                "scrg_hf": lambda: generate(student, prompts, "scrg", teacher=teacher, config=cfg_hf, params=sc, **kw),
                # SCRG's teacher scoring forward over prompt + response, alone
                "score": lambda: CachedLM(teacher, ids, mask, n).score(scored),
            })
        best = {k: math.inf for k in variants}
        for _ in range(args.repeats):  # interleaved, so a change in machine load hits every variant alike
            for k, fn in variants.items():
                best[k] = min(best[k], timed(fn, 1))
        t_switch, t_hf_s, t_hf_t = best["switch"], best["hf_s"], best["hf_t"]
        spec = [dict(k=k, time=best[f"spec{k}"], **forwards(o), agree=agreement(sw_out, o))
                for k, o in spec_out.items()]
        t_naive = None
        if not args.no_naive and not args.switch_only:
            t_naive = timed(lambda: naive_switch(student, teacher, prompts, cfg, sw, pad), 1)
        floor = t_hf_s + t_hf_t
        frac = sum(s["teacher_fraction"] for s in sw_out.stats) / len(sw_out.stats)
        row = dict(n=n, switch=t_switch, naive=t_naive, floor=floor, hf_s=t_hf_s, hf_t=t_hf_t, frac=frac, spec=spec,
                   step_fw=forwards(sw_out))
        if not args.switch_only:
            row.update(student=best["student"], scrg=best["scrg"], score=best["score"], switch_hf=best["switch_hf"],
                       scrg_hf=best["scrg_hf"],
                       regen=sum(s["regenerated_tokens"] for s in sc_out.stats) / len(sc_out.stats),
                       first_j=min((s["correction_positions"][0] for s in sc_out.stats if s["correction_positions"]),
                                   default=-1))
        rows.append(row)
        print(f"n={n}: done", file=sys.stderr)

    lines = [
        f"Tiny models (tiny-student 1.3M, tiny-teacher 5.8M, random weights), batch {args.batch}, prompts "
        f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, full-length sampling (no EOS), CPU "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}; {'CPU' if args.clock == 'cpu' else 'wall'} time; "
        f"switch tau0={switch_tau0:.4g} (quantile {args.tau0_quantile} of the probe's JSDs), decay=0.",
        "",
    ]
    if not args.switch_only:
        lines += [
        "| new tokens | switch (s) | floor: HF student + teacher generate (s) | **switch / floor** | naive switch (s) "
        "| **naive / switch** | switch, hf decoder (s) | hf-decoder switch / floor | teacher-token share |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            naive = f"{r['naive']:.2f}" if r["naive"] is not None else "-"
            speed = f"{r['naive'] / r['switch']:.1f}x" if r["naive"] is not None else "-"
            lines.append(
                f"| {r['n']} | {r['switch']:.3f} | {r['floor']:.3f} | {r['switch'] / r['floor']:.2f}x | {naive} "
                f"| {speed} | {r['switch_hf']:.3f} | {r['switch_hf'] / r['floor']:.2f}x | {r['frac']:.0%} |")
        lines.append("")
    lines += [
        "| new tokens | switch, one step per token (s) | floor (s) | switch / floor | speculative k <= K | time (s) "
        "| **speculative / switch** | **speculative / floor** | teacher forwards per token (switch: 1) "
        "| student forwards per token (switch: 1) | float32 rows identical to switch | teacher-token share |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for sp in r["spec"]:
            lines.append(
                f"| {r['n']} | {r['switch']:.3f} | {r['floor']:.3f} | {r['switch'] / r['floor']:.2f}x | {sp['k']} "
                f"| {sp['time']:.3f} | {sp['time'] / r['switch']:.2f}x | {sp['time'] / r['floor']:.2f}x "
                f"| {sp['teacher']:.3f} | {sp['student']:.3f} | {sp['agree']} | {r['frac']:.0%} |")
    if not args.switch_only:
        lines += [
        "",
        "| new tokens | scrg (s) | HF student generate (s) | **scrg / HF student** | our student (s) "
        "| scrg / our student | scrg, hf decoder (s) | hf-decoder scrg / HF student | teacher scoring forward (s) "
        "| mean regenerated | earliest j |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['n']} | {r['scrg']:.3f} | {r['hf_s']:.3f} | {r['scrg'] / r['hf_s']:.2f}x | {r['student']:.3f} "
                f"| {r['scrg'] / r['student']:.2f}x | {r['scrg_hf']:.3f} | {r['scrg_hf'] / r['hf_s']:.2f}x "
                f"| {r['score']:.3f} | {r['regen']:.0f} | {r['first_j']} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        cmd = "python bench/generation.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.out).write_text(f"# Generation benchmark\n\nCommand: `{cmd.strip()}`\n\n{table}\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
