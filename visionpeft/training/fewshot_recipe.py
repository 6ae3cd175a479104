"""Few-shot CLIP classification as a recipe (``task: fewshot``), run by ``visionpeft train`` / ``visionpeft eval``.

A recipe is validated before anything runs::

    model:    library (open_clip | transformers); name: an open_clip architecture ("ViT-B-16") or a transformers
              CLIP directory / hub id; pretrained: open_clip's local checkpoint file or pretrained tag; config:
              open_clip.CLIP keyword arguments for a randomly initialised model (seeded by train.seed);
              mean, std (null: the model's own preprocessing)
    adapter:  method (any registered method), options, targets
    data:     split_file (CoOp split JSON), image_root, train_split, eval_split, shots (K per class), seed (of the
              K-shot draw), templates (default CoOp's single "a photo of a {}."), augmentation, num_workers
    train:    steps or epochs (neither: CLIP-SVD's 200·K steps), batch_size, eval_batch_size, lr, weight_decay,
              warmup_steps, min_lr (the cosine's floor), precision, eval_interval, seed, device
    output:   the run directory

Class names come from the training split (underscores read as spaces, as CoOp does). The run evaluates the
zero-shot top-1 of the model with the adapter at its exact start (the baseline), trains the adapter with
:func:`visionpeft.fewshot.train_few_shot` (AdamW, warm-up + cosine, text classifier recomputed every step), and
writes ``adapter/`` (``vp.save``), ``metrics.csv``, ``summary.json``, ``curves.png`` and ``recipe.json``.
One process, one device: the K-shot protocol trains in minutes on one GPU.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from visionpeft.training.recipe import (
    ADAPTER_SECTION, NUMBER, REQUIRED, apply_overrides, check_method_options, read_yaml, validate_schema,
)

TASK = "fewshot"
NULL = type(None)
#: the vocabulary of open_clip's (and OpenAI CLIP's) BPE tokenizer: a text tower built from a config must cover it
CLIP_VOCAB_SIZE = 49408
SCHEMA: dict[str, Any] = {
    "task": ((str,), REQUIRED),
    "model": {
        "library": ((str,), "open_clip"),
        "name": ((str, NULL), None),
        "pretrained": ((str, NULL), None),
        "config": ((dict, NULL), None),
        "mean": ((list, NULL), None),
        "std": ((list, NULL), None),
    },
    "adapter": ADAPTER_SECTION,
    "data": {
        "split_file": ((str,), REQUIRED),
        "image_root": ((str,), REQUIRED),
        "train_split": ((str,), "train"),
        "eval_split": ((str,), "test"),
        "shots": ((int,), 16),
        "seed": ((int,), 1),
        "templates": ((list,), ["a photo of a {}."]),
        "augmentation": ((str,), "random_resized_crop"),
        "num_workers": ((int,), 0),
    },
    "train": {
        "steps": ((int, NULL), None),
        "epochs": ((int, NULL), None),
        "batch_size": ((int,), 32),
        "eval_batch_size": ((int,), 64),
        "lr": (NUMBER, 5e-4),
        "weight_decay": (NUMBER, 0.01),
        "warmup_steps": ((int,), 0),
        "min_lr": (NUMBER, 1e-6),
        "precision": ((str,), "no"),
        "eval_interval": ((int, NULL), None),
        "seed": ((int,), 0),
        "device": ((str,), "auto"),
    },
    "output": ((str,), REQUIRED),
}
CHOICES = {
    "task": (TASK,),
    "model.library": ("open_clip", "transformers"),
    "data.augmentation": ("random_resized_crop", "none"),
    "train.precision": ("no", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
}
AT_LEAST_ONE = ("data.shots", "train.steps", "train.epochs", "train.batch_size", "train.eval_batch_size",
                "train.eval_interval")
AT_LEAST_ZERO = ("data.num_workers", "train.warmup_steps", "train.weight_decay", "train.min_lr")


# --- the recipe ---------------------------------------------------------------------------------
def validate(raw: Any, source: str = "recipe") -> dict[str, Any]:
    """A complete few-shot recipe (defaults filled in); a ValueError names the first bad key and what is allowed."""
    recipe = validate_schema(raw, SCHEMA, CHOICES, source)
    _check_ranges(recipe, source)
    _check_model(recipe["model"], source)
    _check_templates(recipe["data"]["templates"], source)
    _check_adapter(recipe["adapter"], source)
    return recipe


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a few-shot recipe file, apply dotted overrides (``data.shots=4``), validate."""
    return validate(apply_overrides(read_yaml(path), list(overrides)), source=str(path))


def _value(recipe: dict[str, Any], key: str) -> Any:
    section, name = key.split(".")
    return recipe[section][name]


def _check_ranges(recipe: dict[str, Any], source: str) -> None:
    for key in AT_LEAST_ONE:
        if _value(recipe, key) is not None and _value(recipe, key) < 1:
            raise ValueError(f"{source}: {key}={_value(recipe, key)!r} must be >= 1")
    for key in AT_LEAST_ZERO:
        if _value(recipe, key) < 0:
            raise ValueError(f"{source}: {key}={_value(recipe, key)!r} must be >= 0")
    train = recipe["train"]
    if train["steps"] is not None and train["epochs"] is not None:
        raise ValueError(f"{source}: give at most one of train.steps and train.epochs (got steps={train['steps']!r}, "
                         f"epochs={train['epochs']!r}); with neither, the run takes 200 x data.shots steps")
    if train["lr"] <= 0 or train["min_lr"] > train["lr"]:
        raise ValueError(f"{source}: need train.lr > 0 and train.min_lr <= train.lr (got lr={train['lr']!r}, "
                         f"min_lr={train['min_lr']!r})")
    if train["steps"] is not None and train["warmup_steps"] >= train["steps"]:
        raise ValueError(f"{source}: train.warmup_steps={train['warmup_steps']!r} must be < train.steps="
                         f"{train['steps']!r}")


def _check_model(model: dict[str, Any], source: str) -> None:
    if model["library"] == "transformers":
        if not model["name"] or model["config"] is not None or model["pretrained"] is not None:
            raise ValueError(f"{source}: model.library=transformers takes model.name (a CLIP directory or hub id) "
                             f"and neither model.config nor model.pretrained")
    elif (model["name"] is None) == (model["config"] is None):
        raise ValueError(f"{source}: give exactly one of model.name (an open_clip architecture, e.g. ViT-B-16) and "
                         f"model.config (open_clip.CLIP keyword arguments)")
    elif model["config"] is not None:
        if model["pretrained"] is not None:
            raise ValueError(f"{source}: model.pretrained goes with model.name, not with model.config")
        vocab = (model["config"].get("text_cfg") or {}).get("vocab_size", CLIP_VOCAB_SIZE)
        if vocab < CLIP_VOCAB_SIZE:
            raise ValueError(f"{source}: model.config.text_cfg.vocab_size={vocab!r} must be >= {CLIP_VOCAB_SIZE} "
                             f"(the vocabulary of CLIP's tokenizer)")
    for key in ("mean", "std"):
        value = model[key]
        if value is not None and not (len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
            raise ValueError(f"{source}: model.{key}={value!r} must be null or a list of 3 numbers")


def _check_templates(templates: list, source: str) -> None:
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if not templates or bad:
        raise ValueError(f"{source}: data.templates must be a non-empty list of strings with a '{{}}' for the class "
                         f"name, e.g. ['a photo of a {{}}.']; bad: {bad or templates!r}")


def _check_adapter(adapter: dict[str, Any], source: str) -> None:
    check_method_options(adapter["method"], adapter["options"], source)


# --- the data -----------------------------------------------------------------------------------
def read_splits(recipe: dict[str, Any]):
    """(train split, eval split, class names) from the CoOp split JSON, checked; transforms are set later."""
    from visionpeft.fewshot import CoOpSplit

    data = recipe["data"]
    train = CoOpSplit(data["split_file"], data["image_root"], data["train_split"])
    evaluation = CoOpSplit(data["split_file"], data["image_root"], data["eval_split"])
    classes = len(train.classnames)
    if sorted(set(train.labels)) != list(range(classes)):
        raise ValueError(f"data.train_split {data['train_split']!r} of {data['split_file']!r} must have labels "
                         f"0..N-1 with every class present; it has {sorted(set(train.labels))}")
    outside = sorted({label for label in evaluation.labels if label >= classes})
    if outside:
        raise ValueError(f"data.eval_split {data['eval_split']!r} has labels {outside} that the training split "
                         f"(classes 0..{classes - 1}) does not have")
    # CoOp's class names are folder-style ("american_bulldog"); its prompt learner reads them with spaces
    return train, evaluation, [name.replace("_", " ") for name in train.classnames]


def total_steps(recipe: dict[str, Any], classes: int) -> int:
    train, shots = recipe["train"], recipe["data"]["shots"]
    if train["steps"] is not None:
        return train["steps"]
    if train["epochs"] is None:
        return 200 * shots  # CLIP-SVD's few-shot protocol (its config's epochs are ignored on that path)
    examples = shots * classes
    return train["epochs"] * max(1, examples // min(train["batch_size"], examples))


# --- the model ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Clip:
    model: nn.Module
    tokenize: Callable
    image_size: int
    mean: list[float] | None
    std: list[float] | None


def build_clip(spec: dict[str, Any], seed: int) -> Clip:
    """The CLIP model of the recipe; seeded, so a model built from a config is the same at train and eval time."""
    torch.manual_seed(seed)
    clip = _transformers_clip(spec["name"]) if spec["library"] == "transformers" else _open_clip(spec)
    clip.mean = spec["mean"] or clip.mean
    clip.std = spec["std"] or clip.std
    return clip


def _open_clip(spec: dict[str, Any]) -> Clip:
    import open_clip

    if spec["config"] is not None:
        model = open_clip.CLIP(**spec["config"])
        context = (spec["config"].get("text_cfg") or {}).get("context_length", 77)
        tokenize = open_clip.tokenizer.SimpleTokenizer(context_length=context)
    else:
        model = open_clip.create_model(spec["name"], pretrained=spec["pretrained"])
        tokenize = open_clip.get_tokenizer(spec["name"])
    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = model.visual.image_size
    return Clip(model, tokenize, size[0] if isinstance(size, (tuple, list)) else size,
                preprocess.get("mean"), preprocess.get("std"))


def _transformers_clip(name: str) -> Clip:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(name)
    tokenizer = AutoTokenizer.from_pretrained(name)
    try:
        processor = CLIPImageProcessor.from_pretrained(name)
        mean, std = processor.image_mean, processor.image_std
    except OSError:  # a directory without preprocessor_config.json: CLIP's own statistics
        mean = std = None

    def tokenize(prompts: list[str]):
        return tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")

    return Clip(model, tokenize, model.config.vision_config.image_size, mean, std)


def _set_transforms(recipe: dict[str, Any], clip: Clip, train, evaluation) -> None:
    from visionpeft.fewshot import clip_transform

    stats = {k: v for k, v in (("mean", clip.mean), ("std", clip.std)) if v is not None}
    augment = recipe["data"]["augmentation"] == "random_resized_crop"
    train.transform = clip_transform(clip.image_size, train=augment, **stats)
    evaluation.transform = clip_transform(clip.image_size, **stats)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available; allowed here: auto, cpu")
    return torch.device(name)


def _prepare(recipe: dict[str, Any]):
    """Splits read and checked (fails before the model is built), then the model on its device, transforms set."""
    train_set, eval_set, classnames = read_splits(recipe)
    device = _device(recipe["train"]["device"])
    clip = build_clip(recipe["model"], recipe["train"]["seed"])
    _set_transforms(recipe, clip, train_set, eval_set)
    return clip, train_set, eval_set, classnames, device


# --- the run ------------------------------------------------------------------------------------
def train(recipe: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Run a validated few-shot recipe (see :func:`validate`); returns the summary (also in summary.json)."""
    import visionpeft as vp
    from visionpeft.fewshot import ClipClassifier, train_few_shot
    from visionpeft.training.outputs import write_csv, write_json
    from visionpeft.training.runner import peak_memory_mb, plot_curves

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would train alone and write the same files
        raise ValueError("task: fewshot runs in one process; start it with visionpeft train, not a multi-process launch")
    clip, train_set, eval_set, classnames, device = _prepare(recipe)
    data, cfg, adapter = recipe["data"], recipe["train"], recipe["adapter"]
    output = Path(recipe["output"])
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "recipe.json", recipe)
    model = clip.model.to(device)
    vp.attach(model, adapter["method"], targets=adapter["targets"], **adapter["options"])
    classifier = ClipClassifier(model, clip.tokenize, classnames, data["templates"])
    history: list[dict[str, Any]] = []

    def on_step(record: dict[str, Any]) -> None:
        history.append(record)
        if record["step"] == 0 and progress:
            print(f"zero-shot top-1 {record['top1']:.2f}% ({len(classnames)} classes, {len(eval_set)} images)",
                  file=sys.stderr)

    result = train_few_shot(
        classifier, train_set, eval_set, shots=data["shots"], seed=data["seed"],
        steps=total_steps(recipe, len(classnames)), batch_size=cfg["batch_size"], lr=cfg["lr"],
        weight_decay=cfg["weight_decay"], progress=progress, warmup_steps=cfg["warmup_steps"], min_lr=cfg["min_lr"],
        precision=cfg["precision"], eval_interval=cfg["eval_interval"], eval_batch_size=cfg["eval_batch_size"],
        num_workers=data["num_workers"], on_step=on_step)
    vp.save(model, output / "adapter")
    write_csv(output / "metrics.csv", history, ["step", "loss", "lr", "seconds", "top1"])
    summary = {
        "task": TASK,
        "method": adapter["method"],
        "zero_shot_top1": result["zero_shot_top1"],
        "few_shot_top1": result["few_shot_top1"],
        "trainable_parameters": sum(p.numel() for p in vp.trainable_parameters(model).values()),
        "shots": data["shots"],
        "seed": data["seed"],
        "train_seed": cfg["seed"],
        "classes": len(classnames),
        "templates": data["templates"],
        "steps": result["steps"],
        "final_loss": result["final_loss"],
        "step_time_s": result["step_time_s"],
        "peak_memory_mb": peak_memory_mb(device),
        "adapter": str(output / "adapter"),
    }
    write_json(output / "summary.json", summary)
    _atomic_plot(history, output / "curves.png", plot_curves,
                 title=f"{adapter['method']} {data['shots']}-shot on {Path(data['split_file']).name}")
    return summary


def _atomic_plot(history: list[dict[str, Any]], path: Path, plot: Callable, title: str) -> None:
    staging = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix tells matplotlib the format
    plot(history, staging, title=title)
    os.replace(staging, path)


def evaluate_adapter(recipe: dict[str, Any], adapter_dir: str | os.PathLike) -> float:
    """Top-1 (%) of a saved adapter on the recipe's evaluation split (``visionpeft eval``)."""
    import visionpeft as vp
    from visionpeft.fewshot import ClipClassifier, evaluate

    clip, _, eval_set, classnames, device = _prepare(recipe)
    vp.load(clip.model, adapter_dir)
    classifier = ClipClassifier(clip.model.to(device), clip.tokenize, classnames, recipe["data"]["templates"])
    return evaluate(classifier, eval_set, recipe["train"]["eval_batch_size"], recipe["data"]["num_workers"])
