"""The ``visionpeft`` command line: train, eval, sweep, generate, methods, targets."""
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
    print("full, linear, peft-lora  (recipe baselines: full fine-tuning, linear probe, Hugging Face PEFT LoRA)")
    return 0


def _recipe_kind(path: str, overrides: list[str]) -> str:
    """``classification`` (the runner), or the recipe's ``task``: ``dreambooth`` or ``fewshot``."""
    from visionpeft.training.recipe import apply_overrides, read_yaml

    raw = apply_overrides(read_yaml(path), overrides)
    return (raw.get("task") if isinstance(raw, dict) else None) or "classification"


def _recipe_module(kind: str):
    """The module that loads and runs recipes of this kind (``load_recipe``, ``train``, ``evaluate_adapter``)."""
    if kind == "dreambooth":
        from visionpeft.training import dreambooth as module
    elif kind == "fewshot":
        from visionpeft.training import fewshot_recipe as module
    else:
        from visionpeft.training import runner as module  # its recipes are read by training.load_recipe
    return module


def _load(kind: str, args: argparse.Namespace):
    if kind == "classification":
        from visionpeft.training import load_recipe

        return load_recipe(args.recipe, args.overrides)
    return _recipe_module(kind).load_recipe(args.recipe, args.overrides)


def _train(args: argparse.Namespace) -> int:
    kind = _recipe_kind(args.recipe, args.overrides)
    recipe = _load(kind, args)
    summary = _recipe_module(kind).train(recipe, progress=not args.quiet)
    if summary:
        print(json.dumps({k: v for k, v in summary.items() if k != "fingerprint"}, indent=2))
        print(f"outputs in {recipe['output']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    kind = _recipe_kind(args.recipe, args.overrides)
    if kind == "dreambooth":
        raise ValueError(f"{args.recipe!r} is a dreambooth recipe; evaluate its images with visionpeft generate and "
                         f"visionpeft.eval.subject (DINO, CLIP-I, CLIP-T)")
    top1 = _recipe_module(kind).evaluate_adapter(_load(kind, args), args.adapter)
    print(f"top-1 {top1:.2f}% ({args.adapter})")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from visionpeft.training.recipe import read_yaml
    from visionpeft.training.sweep import sweep

    kind = _recipe_kind(args.recipe, args.overrides)
    if kind != "classification":
        raise ValueError(f"{args.recipe!r} is a {kind} recipe; sweep runs classification recipes (vtab1k, fgvc) over "
                         f"their benchmark's tasks")
    print(sweep(read_yaml(args.recipe), args.overrides, args.tasks, progress=not args.quiet))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from visionpeft.models.pipelines import apply_adapter, generate, image_grid, load_pipeline, save_image

    pipeline = load_pipeline(args.pipeline, dtype=getattr(torch, args.dtype))
    if args.device:
        pipeline.to(args.device)
    if args.adapter:
        apply_adapter(pipeline, args.adapter, merge=args.merge, scale=args.scale)
    elif args.merge or args.scale != 1.0:
        raise ValueError("--merge and --scale apply to an adapter; give --adapter DIR")
    images = generate(pipeline, args.prompt, images_per_prompt=args.num_images, steps=args.steps,
                      guidance_scale=args.guidance_scale, seed=args.seed, size=args.size, batch_size=args.batch_size,
                      sampler=args.sampler, progress=not args.quiet)
    out = Path(args.out)
    for i, image in enumerate(images):
        prompt_index, image_index = divmod(i, args.num_images)
        print(save_image(image, out / f"prompt{prompt_index:02d}_{image_index:02d}.png"))
    print(save_image(image_grid(images, columns=args.num_images), out / "grid.png"))  # a row per prompt
    return 0


def _targets(args: argparse.Namespace) -> int:
    """What targets=None (or --targets) would adapt on a timm model built with pretrained=False."""
    from collections import Counter

    import timm

    from visionpeft.targeting import resolve_targets

    try:
        model = timm.create_model(args.model, pretrained=False)
    except RuntimeError as err:  # timm's "Unknown model"
        raise ValueError(f"{args.model!r} is not a timm model name ({err}); list them with timm.list_models()") from None
    spec = None
    if args.targets:
        spec = args.targets[0] if len(args.targets) == 1 and args.targets[0] == "all" else list(args.targets)
    if args.regex:
        spec = args.regex
    chosen = resolve_targets(model, spec)
    kinds: Counter = Counter()
    weights = 0
    for target in chosen:
        for slot in target.slots:
            print(f"{target.name}:{slot}")
            kinds[target.kind.name] += 1
            weights += target.kind.read(target.module, slot).numel()
    total = sum(p.numel() for p in model.parameters())
    by_kind = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
    print(f"{sum(kinds.values())} slots in {len(chosen)} layers ({by_kind}); {weights:,} of {total:,} weights "
          f"({100 * weights / total:.1f}%) in adapted layers")
    return 0


class _TasksAction(argparse.Action):
    """``--tasks a b key=value``: the words with ``=`` are overrides, not task names."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        tasks = [v for v in values if "=" not in v]
        if not tasks:
            parser.error(f"{option_string} needs at least one task name, got {' '.join(values)}")
        setattr(namespace, self.dest, tasks)
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + [v for v in values if "=" in v]


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
    sweep.add_argument("--tasks", nargs="+", default=None, action=_TasksAction,
                       help="task names (key=value words among them are overrides)")
    sweep.add_argument("--quiet", action="store_true")
    sweep.set_defaults(run=_sweep)
    gen = commands.add_parser("generate", help="sample images from an SD, SDXL, SD3 or FLUX pipeline with a saved adapter")
    gen.add_argument("--pipeline", required=True, help="local pipeline directory or hub id")
    gen.add_argument("--adapter", help="a saved pipeline adapter directory (vp.save of the denoiser; text_encoder/, "
                     "text_encoder_2/, ... inside when text encoders were trained)")
    gen.add_argument("--prompt", required=True, nargs="+", help="one or more prompts")
    gen.add_argument("--scale", type=float, default=1.0, help="adapter strength; other than 1 it is applied by merging")
    gen.add_argument("--merge", action="store_true", help="fold the adapter into the weights before sampling")
    gen.add_argument("--out", default="generated", help="output folder (prompt<P>_<I>.png and grid.png)")
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt")
    gen.add_argument("--steps", type=int, default=25, help="sampling steps")
    gen.add_argument("--guidance-scale", type=float, default=7.5,
                     help="classifier-free guidance (FLUX: the guidance its transformer embeds, e.g. 3.5)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", type=int, default=None, help="image side in pixels (default: the pipeline's)")
    gen.add_argument("--batch-size", type=int, default=4)
    gen.add_argument("--sampler", choices=("auto", "dpmsolver", "pipeline"), default="auto",
                     help="auto: DPM-Solver++ for SD and SDXL, the pipeline's flow-matching scheduler for SD3 and FLUX")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--device", default=None, help="e.g. cuda (default: where the pipeline loads)")
    gen.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                     help="weights of the pipeline (adapters keep float32 parameters)")
    gen.set_defaults(run=_generate)
    shown = commands.add_parser("targets", help="the layers targets=None (or --targets) adapts on a timm model")
    shown.add_argument("model", help="a timm model name, built with pretrained=False")
    shown.add_argument("--targets", nargs="+", default=None, help="module names (exact or dotted suffix), or all")
    shown.add_argument("--regex", default=None, help="a regular expression, full match on the qualified name")
    shown.set_defaults(run=_targets)
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides after an option (e.g. after --quiet) land here
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"visionpeft {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # training stops cleanly on Ctrl-C; its message says how to resume
        print(f"visionpeft {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
