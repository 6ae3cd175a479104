"""Recipes: YAML files validated against a schema before anything runs, with dotted overrides.

    model:    timm name, pretrained flag or local checkpoint, num_classes, image size, normalization
    adapter:  method (a registered method, or the baselines "full", "linear" and "peft-lora"), options,
              targets, unfreeze
    data:     format (vtab1k | fgvc | imagefolder), root, task, splits, augmentation
    train:    epochs or steps, batch size, lr, weight decay and no-decay rules, warm-up, cosine schedule,
              precision, gradient accumulation, seed, eval interval, checkpoints, resume
    output:   the run directory; ``{task}`` and ``{method}`` in it are filled in (the shipped recipes write to
              ``runs/<benchmark>/<method>/{task}``, so runs of two tasks never share a folder)

Units and modes of the keys that need them:

- ``train.eval_interval`` counts epochs when ``train.epochs`` is set and steps when ``train.steps`` is set
  (``train.eval_last``: also evaluate after each of the last N epochs).
- ``train.checkpoint_interval``: ``eval`` (the default) writes a checkpoint at each evaluation, an int every
  that many optimizer steps, null never; ``train.keep_checkpoints`` keeps the newest N (null: all). Ctrl-C
  writes one too.
- ``train.resume``: ``auto`` resumes the latest checkpoint of the same settings (a finished run is reported and
  kept; other settings are refused, naming the keys that differ), ``never`` / ``restart`` / null start fresh,
  a path resumes that checkpoint. See :mod:`visionpeft.training.checkpoints`.
- ``train.precision``: ``no`` (YAML's unquoted no/off/false read as false are accepted), ``bf16``, ``fp16``,
  or ``auto`` (the best for the device: bf16 or fp16 on a GPU, full precision on the CPU).
- ``train.device``: ``auto``, ``cpu`` or ``cuda`` (an error where there is no GPU).
- ``train.compile``: ``true`` runs the model through ``torch.compile`` (inductor; an error where it is missing).
- ``train.fsdp``: ``true`` shards the adapted model with FSDP2 under a distributed launch of 2 or more processes
  (torchrun or ``accelerate launch``; GPUs or the CPU over gloo): :mod:`visionpeft.training.fsdp`.
- ``data.alpha_holdout``: for ``adapter.method=alpha-lora``, the fraction of the training split held out for α's
  bi-level step (its own Adam every ``adapter.options.alpha_every`` steps on a held-out batch;
  :mod:`visionpeft.training.alpha_steps`); null trains α with the adapter.

An unknown key, a missing required key or a value of the wrong type is a ValueError that names the
dotted key and says what is allowed.
"""
from __future__ import annotations

import copy
import string
from pathlib import Path
from typing import Any

import yaml

NUMBER = (int, float)

#: section -> key -> (allowed types, default); a default of REQUIRED must be given
REQUIRED = object()
#: the adapter section every recipe kind shares: a registered method, its options, its targets
ADAPTER_SECTION: dict[str, tuple[tuple, Any]] = {
    "method": ((str,), REQUIRED),
    "options": ((dict,), {}),
    "targets": ((str, list, type(None)), None),
}
SCHEMA: dict[str, dict[str, tuple[tuple, Any]]] = {
    "model": {
        "name": ((str,), REQUIRED),
        "pretrained": ((bool,), False),
        "checkpoint": ((str, type(None)), None),
        "num_classes": ((int, type(None)), None),
        "image_size": ((int,), 224),
        "mean": ((list,), [0.485, 0.456, 0.406]),
        "std": ((list,), [0.229, 0.224, 0.225]),
        "kwargs": ((dict,), {}),
    },
    "adapter": ADAPTER_SECTION | {"unfreeze": ((list,), ["head"])},
    "data": {
        "format": ((str,), REQUIRED),
        "root": ((str,), REQUIRED),
        "task": ((str, type(None)), None),
        "train_split": ((str,), "train"),
        "eval_split": ((str,), "test"),
        "augmentation": ((str,), "none"),
        "num_workers": ((int,), 0),
        "alpha_holdout": ((int, float, type(None)), None),
    },
    "train": {
        "epochs": ((int, type(None)), None),
        "steps": ((int, type(None)), None),
        "batch_size": ((int,), 64),
        "eval_batch_size": ((int, type(None)), None),
        "lr": (NUMBER, 1e-3),
        "weight_decay": (NUMBER, 1e-4),
        "no_decay": ((list,), ["bias", "norm", "pos_embed", "cls_token", "1d"]),
        "warmup_epochs": (NUMBER, 0),
        "warmup_lr": (NUMBER, 1e-6),
        "min_lr": (NUMBER, 1e-5),
        "label_smoothing": (NUMBER, 0.0),
        "precision": ((str,), "no"),
        "grad_accum": ((int,), 1),
        "grad_clip": ((int, float, type(None)), None),
        "seed": ((int,), 0),
        "eval_interval": ((int,), 1),
        "eval_last": ((int,), 0),
        "checkpoint_interval": ((int, str, type(None)), "eval"),
        "keep_checkpoints": ((int, type(None)), 2),
        "resume": ((str, type(None)), None),
        "device": ((str,), "auto"),
        "log_interval": ((int,), 10),
        "compile": ((bool,), False),
        "fsdp": ((bool,), False),
    },
    "output": ((str,), REQUIRED),
}

CHOICES = {
    "data.format": ("vtab1k", "fgvc", "imagefolder"),
    "data.augmentation": ("none", "vpt", "ssf"),
    "train.precision": ("no", "bf16", "fp16", "auto"),
    "train.device": ("auto", "cpu", "cuda"),
}
BASELINES = ("full", "linear", "peft-lora")
#: options of the baselines that take any: Hugging Face PEFT's LoRA, the outside peer (``use_dora``: PEFT's DoRA)
BASELINE_OPTIONS = {"peft-lora": {"rank": (int,), "alpha": (int, float, type(None)), "dropout": (int, float),
                                  "use_dora": (bool,)}}


def _type_names(types: tuple) -> str:
    names = {int: "an int", float: "a number", str: "a string", bool: "true/false", list: "a list", dict: "a mapping",
             type(None): "null"}
    shown = [t for t in types if not (t is int and float in types)]  # "a number" covers ints
    return " or ".join(dict.fromkeys(names[t] for t in shown))


def _coerce(value: Any, types: tuple) -> Any:
    """PyYAML reads ``1e-3`` (no dot) as a string; accept it where a number is expected."""
    if float in types and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check_value(key: str, value: Any, types: tuple, choices: dict[str, tuple] = CHOICES) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    allowed = choices.get(key)
    if not ok and allowed:
        raise ValueError(f"recipe key {key!r} is {value!r}; allowed: {', '.join(allowed)}")
    if not ok:
        raise ValueError(f"recipe key {key!r} must be {_type_names(types)}, got {value!r}")
    if allowed and value not in allowed:
        raise ValueError(f"recipe key {key!r} is {value!r}; allowed: {', '.join(allowed)}")


def validate_schema(raw: Any, schema: dict[str, Any], choices: dict[str, tuple], source: str) -> dict[str, Any]:
    """``raw`` checked against a schema (section -> key -> (types, default), or a top-level key -> (types,
    default)) with defaults filled in; a ValueError names the first unknown, missing or mistyped key."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source} must be a mapping with sections {', '.join(schema)}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(schema)}")

    def field(key: str, given: dict, name: str, spec: tuple) -> Any:
        types, default = spec
        if name in given:
            value = _coerce(given[name], types)
            if value is False and "no" in choices.get(key, ()):  # YAML 1.1 reads an unquoted no / off as false
                value = "no"
        elif default is REQUIRED:
            raise ValueError(f"{source}: missing required key {key}")
        else:
            value = copy.deepcopy(default)
        check_value(key, value, types, choices)
        return value

    recipe: dict[str, Any] = {}
    for section, spec in schema.items():
        if isinstance(spec, tuple):  # a top-level scalar such as output
            recipe[section] = field(section, raw, section, spec)
            continue
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping, got {given!r}")
        extra = sorted(set(given) - set(spec))
        if extra:
            raise ValueError(f"{source}: unknown key(s) {', '.join(f'{section}.{k}' for k in extra)}; valid keys in "
                             f"{section!r}: {', '.join(spec)}")
        recipe[section] = {name: field(f"{section}.{name}", given, name, item) for name, item in spec.items()}
    return recipe


def check_method_options(method: str, options: dict[str, Any], source: str, section: str = "adapter") -> None:
    """A registered method and options it accepts; the ValueError names the recipe and the section."""
    from visionpeft.methods.base import get_method, resolve_options

    try:
        resolve_options(get_method(method), options)
    except ValueError as err:
        raise ValueError(f"{source}: {section}: {err}") from None


def validate(raw: Any, source: str = "recipe") -> dict[str, Any]:
    """A complete recipe (defaults filled in) from a parsed mapping; raises ValueError naming the key."""
    recipe = validate_schema(raw, SCHEMA, CHOICES, source)
    _check_semantics(recipe, source)
    recipe["output"] = fill_output(recipe["output"], recipe, source)
    return recipe


#: the placeholders ``output`` may hold
OUTPUT_FIELDS = ("task", "method")


def fill_output(template: str, recipe: dict[str, Any], source: str = "recipe") -> str:
    """``output`` with ``{task}`` (the data.task, or the data.root folder's name) and ``{method}`` filled in."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    unknown = [n for n in names if n not in OUTPUT_FIELDS]
    if unknown:
        raise ValueError(f"{source}: output={template!r} names {{{unknown[0]}}}; it may hold "
                         f"{', '.join('{' + f + '}' for f in OUTPUT_FIELDS)}")
    task = recipe["data"]["task"] or Path(recipe["data"]["root"]).name
    return template.format(task=task, method=recipe["adapter"]["method"])


def _check_semantics(recipe: dict[str, Any], source: str) -> None:
    train = recipe["train"]
    if (train["epochs"] is None) == (train["steps"] is None):
        raise ValueError(f"{source}: give exactly one of train.epochs and train.steps "
                         f"(got epochs={train['epochs']!r}, steps={train['steps']!r})")
    for key in ("epochs", "steps", "batch_size", "grad_accum", "eval_interval", "log_interval", "keep_checkpoints"):
        if train[key] is not None and train[key] < 1:
            raise ValueError(f"{source}: train.{key}={train[key]!r} must be >= 1")
    interval = train["checkpoint_interval"]
    if (isinstance(interval, str) and interval != "eval") or (isinstance(interval, int) and interval < 1):
        raise ValueError(f"{source}: train.checkpoint_interval={interval!r} must be 'eval' (at each evaluation), "
                         f"a number of steps >= 1, or null (no checkpoints)")
    if train["resume"] is not None and not train["resume"].strip():
        raise ValueError(f"{source}: train.resume={train['resume']!r} must be auto, never, restart, null or the "
                         f"path of a checkpoint")
    if train["lr"] <= 0:
        raise ValueError(f"{source}: train.lr={train['lr']!r} must be > 0")
    if train["grad_clip"] is not None and train["grad_clip"] <= 0:
        raise ValueError(f"{source}: train.grad_clip={train['grad_clip']!r} must be > 0, or null for no clipping")
    method = recipe["adapter"]["method"]
    if method not in BASELINES:
        check_method_options(method, recipe["adapter"]["options"], source)
    else:
        allowed = BASELINE_OPTIONS.get(method, {})
        for key, value in recipe["adapter"]["options"].items():
            if key not in allowed:
                raise ValueError(f"{source}: adapter.method={method!r} takes "
                                 f"{'options ' + ', '.join(allowed) if allowed else 'no options'}, got {key!r}")
            check_value(f"adapter.options.{key}", value, allowed[key])
            if key == "rank" and value < 1:
                raise ValueError(f"{source}: adapter.options.rank={value!r} must be >= 1")
    holdout = recipe["data"]["alpha_holdout"]
    if holdout is not None and (method != "alpha-lora" or not 0 < holdout < 1):
        raise ValueError(f"{source}: data.alpha_holdout={holdout!r} must be a fraction in (0, 1) of the training split, "
                         f"held out for the bi-level step of adapter.method=alpha-lora (got method {method!r})")
    if recipe["data"]["format"] == "vtab1k" and not recipe["data"]["task"]:
        raise ValueError(f"{source}: data.task is required for data.format=vtab1k (e.g. cifar, dtd, ...)")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.epochs=2`` → (["train", "epochs"], 2); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value (e.g. train.epochs=2)")
    key, value = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ValueError(f"override {text!r} has an empty key part")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: value is not valid YAML: {err}") from None
    return path, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    result = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return result


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe file parsed (not yet validated): FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {str(path)!r} is not valid YAML: {err}") from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Read, override and validate a recipe file."""
    return validate(apply_overrides(read_yaml(path), list(overrides)), source=str(path))
