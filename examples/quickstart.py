"""Quick start: fine-tune the tiny pretrained ViT shipped with visionpeft on handwritten digits, offline.

A miniature of the VTAB-1k protocol that runs on a laptop CPU in a couple of minutes, with nothing
downloaded: the digits task (scikit-learn's bundled scans) is written to disk in the VTAB-1k format,
a linear probe gives the baseline, then the method (FLoRA by default) is attached to every block of
``visionpeft.models.tiny("vit")`` and trained by the recipe runner with the same schedule. Each run
writes its adapter, ``metrics.csv``, ``summary.json`` and ``curves.png``; the adapter is loaded back
and re-evaluated to show that save/load is exact.

    python examples/quickstart.py [--method flora] [--backbone vit] [--task digits] [--epochs 10] [--resume]

Each run checkpoints at every evaluation; after Ctrl-C, ``--resume`` continues where it stopped (and reuses a run
that had finished).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import visionpeft as vp
from visionpeft.data.mini_vtab import MINI_TASKS, backbone_overrides, write_task
from visionpeft.methods.base import get_method
from visionpeft.models.tiny import CONFIGS
from visionpeft.training import evaluate_adapter, load_recipe, train
from visionpeft.training.interrupt import TrainingInterrupted
from visionpeft.training.recipe import BASELINES

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "mini_vtab"


def run(method: str, args: argparse.Namespace) -> tuple[dict, dict]:
    overrides = [*backbone_overrides(method, args.backbone), f"data.root={args.data}", f"data.task={args.task}",
                 f"output={Path(args.output) / method}", "train.eval_interval=1"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if getattr(args, "resume", False):
        overrides.append("train.resume=auto")
    recipe = load_recipe(RECIPES / f"{method}.yaml", overrides)
    return recipe, train(recipe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="flora", choices=vp.methods() + ["full", "peft-lora"])
    parser.add_argument("--backbone", default="vit", choices=list(CONFIGS))
    parser.add_argument("--task", default="digits", choices=list(MINI_TASKS))
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (10)")
    parser.add_argument("--data", default="runs/mini_vtab", help="where the mini VTAB tasks are written")
    parser.add_argument("--output", default="runs/quickstart")
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs, reuse finished ones")
    args = parser.parse_args()
    method = args.method if args.method in BASELINES else get_method(args.method).name  # clip-svd -> svd

    print(f"writing the mini VTAB task {args.task!r} to {args.data} (kept if already there)")
    write_task(args.data, args.task)
    try:
        _, probe = run("linear", args)
        recipe, tuned = run(method, args)
    except TrainingInterrupted:
        again = sys.argv[1:] + ([] if args.resume else ["--resume"])
        sys.exit(f"interrupted; the run is checkpointed; to continue: python examples/quickstart.py {' '.join(again)}")
    reloaded = evaluate_adapter(recipe, str(Path(recipe["output"]) / "adapter"))

    gain = tuned["final_top1"] - probe["final_top1"]
    print(f"\ntiny {args.backbone} on {args.task} ({MINI_TASKS[args.task][2]}):")
    print(f"  linear probe  top-1 {probe['final_top1']:6.2f}%  {probe['trainable_parameters']:>9,} trainable parameters")
    print(f"  {method:<13} top-1 {tuned['final_top1']:6.2f}%  {tuned['trainable_parameters']:>9,} trainable parameters "
          f"({gain:+.2f} points over the linear probe)")
    print(f"  reloaded adapter top-1 {reloaded:.2f}% ({'exact' if reloaded == tuned['final_top1'] else 'DIFFERS'})")
    print(f"adapter, metrics.csv, summary.json and curves.png in {recipe['output']}")


if __name__ == "__main__":
    main()
