"""``lmdistill train RECIPE.yaml [key=value ...] [--resume [CHECKPOINT]]``."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("train", help="distill a teacher into a student with a recipe",
                       description="Train with a recipe (a YAML file or a built-in name: sft, kd, seqkd, imitkd, gkd, "
                                   "distillm, minillm, mgsr, switch). Any key can be overridden as key=value.")
    p.add_argument("recipe", help="recipe YAML file or built-in recipe name")
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. student=DIR max_steps=100 loss_params.beta=0.5")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from the latest checkpoint in output_dir (or the given checkpoint folder)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import json

    from lmdistill.train import load_config, train

    cfg = load_config(args.recipe, args.overrides)
    result = train(cfg, resume=args.resume)
    print(json.dumps(result, indent=2))
    return 0
