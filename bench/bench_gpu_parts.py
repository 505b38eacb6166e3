"""The in-process parts of ``gpu_check.py`` (not a benchmark itself): the fast decoder against HF ``generate``, and
bf16 losses against float32. ``gpu_check.py`` runs ``python bench/bench_gpu_parts.py SETTINGS_JSON`` in a child
process (time-boxed, its own CUDA memory) and reads the JSON it prints last: ``{part: rows}`` for the parts asked.

``decoder``: per pair, the student loaded in bfloat16 (float32 on the CPU smoke run), ``batch`` Dolly prompts of 8-48
tokens, ``new`` tokens with no EOS (every row runs the full length), sampling at temperature 1: our ``student`` policy
(``generation.generate``, the fast decoder when ``fast_decoder.unsupported_reason`` is ``None``) and HF
``model.generate`` (``bench/generation.py``'s ``hf_generate``), interleaved, the best of ``repeats`` runs each after one
warm-up, a CUDA synchronise around each. Milliseconds per decode step = time / new tokens (prefill included).

``precision``: per pair, one batch of ``rows`` Dolly training rows (gold responses) through the trainer's own loss
path (``Objective`` + ``TermInputs``, chunked) for ``fkl`` and ``jsd`` (beta 0.5): float32 weights and math as the
reference; bf16 as ``mixed_precision=bf16 teacher_dtype=bfloat16`` trains (the student's forward under
``torch.autocast(bfloat16)``, the teacher's weights in bfloat16). Also TRL's ``generalized_jsd_loss`` (beta 0.5) on
the same positions' logits, float32 against autocast bf16 (the teacher's logits cut to the student's rows, as TRL
needs equal vocabularies). Reported: both losses, their relative difference (tolerance ``LOSS_RTOL``) and the cosine
between the student's two gradients (tolerance ``GRAD_COS``).
"""

from __future__ import annotations

import json
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import bench_prompts, hf_generate  # noqa: E402

from lmdistill.data import collate_for_training, load_examples, tokenize_examples  # noqa: E402
from lmdistill.generation import SamplingConfig, generate  # noqa: E402
from lmdistill.generation.fast_decoder import unsupported_reason  # noqa: E402
from lmdistill.losses.objective import Objective, check_objective  # noqa: E402
from lmdistill.losses.term import TermInputs  # noqa: E402
from lmdistill.models import load_model, load_tokenizer  # noqa: E402
from lmdistill.teachers import LocalTeacher  # noqa: E402

LOSS_RTOL = 1e-2
GRAD_COS = 0.99


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best(fn, device: str, repeats: int) -> float:
    import time

    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def decoder(s: dict) -> list[dict]:
    batch, new, repeats = s["decode"]
    dtype = "bfloat16" if s["precision"] == "bf16" else "float32"
    rows = []
    for pair in s["pairs"]:
        folder = Path(s["work"]) / pair / "student"
        tok = load_tokenizer(str(folder))
        model = load_model(str(folder), dtype=dtype, device=s["device"]).eval()
        prompts = bench_prompts(tok, batch)
        cfg = SamplingConfig(max_new_tokens=new, seed=0, temperature=1.0, top_k=0, top_p=1.0)
        pad = tok.pad_token_id
        ours = lambda: generate(model, prompts, "student", config=cfg, pad_id=pad, eos_id=None)  # noqa: E731
        hf = lambda: hf_generate(model, prompts, new, pad, 0)  # noqa: E731
        ours(), hf()   # warm-up (allocations, kernels' first launch)
        t_ours, t_hf = float("inf"), float("inf")
        for _ in range(repeats):   # interleaved
            t_ours = min(t_ours, _best(ours, s["device"], 1))
            t_hf = min(t_hf, _best(hf, s["device"], 1))
        reason = unsupported_reason(model, max(map(len, prompts)) + new)
        rows.append({"pair": pair, "status": "ok", "batch": batch, "new_tokens": new, "dtype": dtype,
                     "ours_ms_per_step": 1e3 * t_ours / new, "hf_ms_per_step": 1e3 * t_hf / new,
                     "ours_over_hf": t_ours / t_hf, "fast_decoder": reason or "yes"})
        del model
    return rows


def _loss_and_grad(student, teacher, batch, rows, tok, term: dict, bf16: bool, device: str):
    obj = Objective(check_objective([{**term, "weight": 1.0}])).to(device)
    student.zero_grad(set_to_none=True)
    ctx = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else nullcontext()
    with ctx:
        inputs = TermInputs(student, LocalTeacher(teacher), batch, batch, same=True, whole=obj.whole_logits(student),
                            rows=rows, tokenizer=tok)
        loss = next(iter(obj(inputs, chunked=True).values()))[0]
    loss.backward()
    grad = torch.cat([p.grad.flatten().double() for p in student.parameters() if p.grad is not None])
    return float(loss.detach()), grad


def _trl_loss_and_grad(student, teacher, batch, bf16: bool, device: str):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    from lmdistill.losses.model_forward import forward_hidden, shifted

    student.zero_grad(set_to_none=True)
    _, mask = shifted(batch)
    ctx = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else nullcontext()
    with ctx:
        hs, ws = forward_hidden(student, batch)
        with torch.no_grad():
            ht, wt = forward_hidden(teacher, batch)
        sel = mask.bool()
        s_logits = hs[:, :-1][sel] @ ws.T
        t_logits = (ht[:, :-1][sel] @ wt[: ws.shape[0]].T)
        loss = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, beta=0.5)
    loss.backward()
    grad = torch.cat([p.grad.flatten().double() for p in student.parameters() if p.grad is not None])
    return float(loss.detach()), grad


def precision(s: dict) -> list[dict]:
    device, out = s["device"], []
    for pair in s["pairs"]:
        folder = Path(s["work"]) / pair
        tok = load_tokenizer(str(folder / "student"))
        student = load_model(str(folder / "student"), dtype="float32", device=device, trainable=True)
        teachers = {False: load_model(str(folder / "teacher"), dtype="float32", device=device).eval(),
                    True: load_model(str(folder / "teacher"), dtype="bfloat16", device=device).eval()}
        examples = load_examples("dolly:train").examples[:64]
        rows, _ = tokenize_examples(examples, tok, template="alpaca", max_prompt_length=256, max_length=512)
        rows = rows[: s["rows"]]
        batch = {k: v.to(device) for k, v in collate_for_training(rows, tok.pad_token_id).items()}
        cases = {"fkl (ours, chunked)": lambda bf16, t: _loss_and_grad(student, t, batch, rows, tok,
                                                                       {"term": "fkl"}, bf16, device),
                 "jsd (ours, chunked)": lambda bf16, t: _loss_and_grad(student, t, batch, rows, tok,
                                                                       {"term": "jsd", "beta": 0.5}, bf16, device),
                 "jsd (TRL generalized_jsd_loss)": lambda bf16, t: _trl_loss_and_grad(student, t, batch, bf16,
                                                                                      device)}
        for name, fn in cases.items():
            ref, g_ref = fn(False, teachers[False])
            low, g_low = fn(True, teachers[True])
            rel = abs(low - ref) / max(abs(ref), 1e-12)
            cos = float(g_ref @ g_low / (g_ref.norm() * g_low.norm()))
            out.append({"pair": pair, "loss": name, "status": "ok", "fp32": ref, "bf16": low, "rel_diff": rel,
                        "grad_cosine": cos, "tokens": int(batch["loss_mask"][:, 1:].sum()),
                        "within_tolerance": rel <= LOSS_RTOL and cos >= GRAD_COS})
        del student, teachers
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def main() -> None:
    settings = json.loads(sys.argv[1])
    if settings["device"] == "cpu":   # the smoke run: one thread, as its neighbours in bench/smoke.sh
        torch.set_num_threads(1)
    parts, out = {"decoder": decoder, "precision": precision}, {}
    for name in settings["parts"]:
        try:
            out[name] = parts[name](settings)
        except Exception as e:  # noqa: BLE001 - one part's failure is reported in its rows; the others still run
            traceback.print_exc()
            out[name] = [{"status": f"failed: {type(e).__name__}: {str(e)[:300]}"}]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
