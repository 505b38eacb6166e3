"""``lmdistill train RECIPE [key=value ...] [--resume [CHECKPOINT]] [--print-config]``."""

from __future__ import annotations

import json
import os
import sys

from lmdistill.cli import COMMANDS
from lmdistill.train import config_yaml, load_config, train
from lmdistill.train.recipes import builtin_recipes


def register(sub) -> None:
    p = sub.add_parser("train", help=COMMANDS["train"],
                       description="Train with a recipe (a YAML file or a built-in name: "
                                   f"{', '.join(builtin_recipes())}). Any key can be overridden as key=value; a term of the objective as "
                                   "objective.NAME.KEY=VALUE, a sampling setting as sampling.KEY=VALUE.")
    p.add_argument("recipe", help="recipe YAML file or built-in recipe name")
    p.add_argument("overrides", nargs="*",
                   help="key=value settings, e.g. student=DIR max_steps=100 objective.jsd.beta=0.9 "
                        "sampling.max_new_tokens=64")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from the latest checkpoint in output_dir (or the given checkpoint folder); refused "
                        "when the settings that change the math differ from the run's (run.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="output_dir holds another run: remove its files (checkpoints, final/, best/, logs) and start "
                        "this one (without it such a folder is refused)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML (a recipe you can save and train from) and exit; the "
                        "student and teacher may be left out (printed empty, marked # required)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    cfg = load_config(args.recipe, args.overrides, require_models=not args.print_config)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # one of several processes (accelerate launch): everything is written and the process group is down, but
        # gloo's threads can still abort the interpreter's exit ("terminate called without an active exception",
        # exit code -6, seen in a slow-test run under load); leave without the exit handlers: nothing is left to run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
