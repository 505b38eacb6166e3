"""``lmdistill models build NAME --out DIR``."""

from __future__ import annotations


def register(sub) -> None:
    from lmdistill.models.build import SIZES

    p = sub.add_parser("models", help="build tiny local models")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    b = msub.add_parser("build", help="build a Llama-style model + the shared tokenizer as a HF folder")
    b.add_argument("name", choices=list(SIZES))
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--pad-vocab-to", type=int, default=None,
                   help="pad the embedding matrix to this many rows (vocabulary-mismatch testing)")
    b.set_defaults(func=cmd_build)


def cmd_build(args) -> int:
    from lmdistill.models import build_model, count_parameters

    model, tok = build_model(args.name, args.out, seed=args.seed, pad_vocab_to=args.pad_vocab_to)
    print(f"wrote {args.name} ({count_parameters(model):,} parameters, vocab {model.config.vocab_size}, "
          f"tokenizer {len(tok)}) to {args.out}")
    return 0
