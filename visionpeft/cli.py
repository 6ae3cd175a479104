"""The ``visionpeft`` command line: train, eval, sweep, methods."""
from __future__ import annotations

import argparse
import json
import sys

from visionpeft.methods.base import get_method, registered_names


def _methods(_: argparse.Namespace) -> int:
    for name in registered_names():
        cls = get_method(name)
        if name != cls.name:
            print(f"{name}  (alias of {cls.name})")
            continue
        print(name)
        for option, spec in cls.options.items():
            print(f"  {option:<14} default {spec.default!r:<8} {spec.allowed}. {spec.help}")
    print("full, linear  (recipe baselines: full fine-tuning, linear probe)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from visionpeft.training import load_recipe, train

    summary = train(load_recipe(args.recipe, args.overrides), progress=not args.quiet)
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from visionpeft.training import evaluate_adapter, load_recipe

    top1 = evaluate_adapter(load_recipe(args.recipe, args.overrides), args.adapter)
    print(f"top-1 {top1:.2f}% ({args.adapter})")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import yaml

    from visionpeft.training.sweep import sweep

    with open(args.recipe) as fh:
        raw = yaml.safe_load(fh) or {}
    print(sweep(raw, args.overrides, args.tasks, progress=not args.quiet))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visionpeft", description="Parameter-efficient fine-tuning for vision models")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("methods", help="the registered methods and their options").set_defaults(run=_methods)
    train = commands.add_parser("train", help="train a recipe: visionpeft train RECIPE.yaml [key=value ...]")
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 adapter.options.rank=4")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)
    evaluate = commands.add_parser("eval", help="evaluate a saved adapter: visionpeft eval RECIPE.yaml --adapter DIR")
    evaluate.add_argument("recipe")
    evaluate.add_argument("overrides", nargs="*")
    evaluate.add_argument("--adapter", required=True)
    evaluate.set_defaults(run=_eval)
    sweep = commands.add_parser("sweep", help="run a recipe over every task of its benchmark and tabulate")
    sweep.add_argument("recipe")
    sweep.add_argument("overrides", nargs="*")
    sweep.add_argument("--tasks", nargs="+", default=None)
    sweep.add_argument("--quiet", action="store_true")
    sweep.set_defaults(run=_sweep)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"visionpeft {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
