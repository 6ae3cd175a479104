"""The DreamBooth recipe: its schema, defaults and checks (``task: dreambooth``; see
:mod:`visionpeft.training.dreambooth` for what each section does). A bad recipe is refused here, with the key and
what is allowed, before a pipeline is loaded or anything is written."""
from __future__ import annotations

import os
from typing import Any

from visionpeft.training import objectives
from visionpeft.training.recipe import (
    ADAPTER_SECTION, NUMBER, REQUIRED, apply_overrides, check_method_options, read_yaml, validate_schema,
)
from visionpeft.training.recipe import SCHEMA as CLASSIFICATION_SCHEMA

TASK = "dreambooth"
NULL = type(None)
SCHEMA: dict[str, Any] = {
    "task": ((str,), REQUIRED),
    "model": {
        "pretrained": ((str,), REQUIRED),
        "revision": ((str, NULL), None),
        "variant": ((str, NULL), None),
    },
    "adapter": ADAPTER_SECTION,
    "text_encoder": {
        "method": ((str, NULL), None),
        "options": ((dict,), {}),
        "targets": ((str, list, NULL), None),
        "components": ((list, NULL), None),
    },
    "data": {
        "instance_dir": ((str,), REQUIRED),
        "instance_prompt": ((str,), REQUIRED),
        "resolution": ((int,), 512),
        "center_crop": ((bool,), True),
        "num_workers": ((int,), 0),
        "cache_latents": ((bool,), False),
        "cache_text_embeddings": ((bool,), False),
        "cache_dir": ((str, NULL), None),
        "max_sequence_length": ((int, NULL), None),
    },
    "prior": {
        "class_prompt": ((str, NULL), None),
        "class_dir": ((str, NULL), None),
        "num_class_images": ((int,), 100),
        "loss_weight": (NUMBER, 1.0),
        "sample_steps": ((int,), 25),
        "sample_batch_size": ((int,), 4),
        "guidance_scale": (NUMBER, 7.5),
    },
    "train": {
        "steps": ((int,), 500),
        "batch_size": ((int,), 1),
        "lr": (NUMBER, 1e-4),
        "weight_decay": (NUMBER, 1e-2),
        "no_decay": ((list,), CLASSIFICATION_SCHEMA["train"]["no_decay"][1]),
        "warmup_steps": ((int,), 0),
        "schedule": ((str,), "constant"),
        "grad_clip": ((int, float, NULL), 1.0),
        "precision": ((str,), "auto"),
        "grad_accum": ((int,), 1),
        "gradient_checkpointing": ((bool,), False),
        "seed": ((int,), 0),
        "device": ((str,), "auto"),
        "checkpoint_interval": ((int, str, NULL), "eval"),
        "keep_checkpoints": ((int, NULL), 2),
        "resume": ((str, NULL), None),
        **objectives.SCHEMA,
    },
    "validation": {
        "prompts": ((list,), []),
        "interval": ((int,), 100),
        "images_per_prompt": ((int,), 2),
        "steps": ((int,), 25),
        "guidance_scale": (NUMBER, 7.5),
        "sampler": ((str,), "auto"),
    },
    "output": ((str,), REQUIRED),
}
CHOICES = {
    "task": (TASK,),
    "train.precision": ("auto", "no", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.schedule": ("constant", "cosine"),
    "validation.sampler": ("auto", "dpmsolver", "pipeline"),
}
POSITIVE = ("data.resolution", "prior.num_class_images", "prior.sample_steps", "prior.sample_batch_size", "train.steps",
            "train.batch_size", "train.grad_accum", "validation.interval",
            "validation.images_per_prompt", "validation.steps")


# --- the recipe ---------------------------------------------------------------------------------
def validate(raw: Any, source: str = "recipe") -> dict[str, Any]:
    """A complete DreamBooth recipe (defaults filled in); a ValueError names the first bad key and what is allowed."""
    recipe = validate_schema(raw, SCHEMA, CHOICES, source)
    _check_semantics(recipe, source)
    return recipe


def _check_semantics(recipe: dict[str, Any], source: str) -> None:
    for key in POSITIVE:
        section, name = key.split(".")
        if recipe[section][name] < 1:
            raise ValueError(f"{source}: {key}={recipe[section][name]!r} must be >= 1")
    train = recipe["train"]
    if train["lr"] <= 0 or train["weight_decay"] < 0 or train["warmup_steps"] < 0:
        raise ValueError(f"{source}: need train.lr > 0, train.weight_decay >= 0 and train.warmup_steps >= 0 (got "
                         f"{train['lr']!r}, {train['weight_decay']!r}, {train['warmup_steps']!r})")
    if train["grad_clip"] is not None and train["grad_clip"] <= 0:
        raise ValueError(f"{source}: train.grad_clip={train['grad_clip']!r} must be > 0, or null for no clipping")
    interval = train["checkpoint_interval"]
    if (isinstance(interval, str) and interval != "eval") or (isinstance(interval, int) and interval < 1):
        raise ValueError(f"{source}: train.checkpoint_interval={interval!r} must be 'eval' (at each validation), a "
                         f"number of steps >= 1, or null (no checkpoints)")
    if not all(isinstance(rule, str) and rule for rule in train["no_decay"]):
        raise ValueError(f"{source}: train.no_decay={train['no_decay']!r} must be a list of parameter-name fragments "
                         f"(or '1d' for every tensor of at most one dimension)")
    if recipe["data"]["resolution"] % 8:
        raise ValueError(f"{source}: data.resolution={recipe['data']['resolution']!r} must be a multiple of 8")
    if recipe["prior"]["loss_weight"] < 0:
        raise ValueError(f"{source}: prior.loss_weight={recipe['prior']['loss_weight']!r} must be >= 0")
    if not all(isinstance(p, str) and p for p in recipe["validation"]["prompts"]):
        raise ValueError(f"{source}: validation.prompts must be a list of non-empty strings, "
                         f"got {recipe['validation']['prompts']!r}")
    _check_prior(recipe["prior"], source)
    for section in ("adapter", "text_encoder"):
        method = recipe[section]["method"]
        if method is None:
            for key in ("options", "targets", "components"):
                if recipe[section].get(key):
                    raise ValueError(f"{source}: {section}.{key}={recipe[section][key]!r} is given without "
                                     f"{section}.method (null: the {section.replace('_', ' ')} is not adapted)")
            continue
        check_method_options(method, recipe[section]["options"], source, section)
    _check_text_caches_and_objective(recipe, source)


def _check_text_caches_and_objective(recipe: dict[str, Any], source: str) -> None:
    from visionpeft.models.pipeline_adapters import TEXT_ENCODER_FOLDERS

    text, data = recipe["text_encoder"], recipe["data"]
    components = text["components"]
    if components is not None:
        bad = [c for c in components if c not in TEXT_ENCODER_FOLDERS]
        if not components or bad or len(set(components)) != len(components):
            raise ValueError(f"{source}: text_encoder.components={components!r} must be a non-empty list of distinct "
                             f"text encoder components: {', '.join(TEXT_ENCODER_FOLDERS)} (or null: the pipeline's "
                             f"CLIP encoders)")
    if data["cache_text_embeddings"] and text["method"] is not None:
        raise ValueError(f"{source}: data.cache_text_embeddings=true with text_encoder.method={text['method']!r}: "
                         f"an adapted text encoder changes its prompt states every step; cache them only with frozen "
                         f"text encoders (text_encoder.method: null)")
    if data["max_sequence_length"] is not None and data["max_sequence_length"] < 1:
        raise ValueError(f"{source}: data.max_sequence_length={data['max_sequence_length']!r} must be >= 1, or null")
    if recipe["train"]["weighting_scheme"] is not None:
        try:
            objectives.check_weighting_scheme(recipe["train"]["weighting_scheme"])
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


def _check_prior(prior: dict[str, Any], source: str) -> None:
    """Without a class prompt there is no prior preservation: any other prior setting would be silently ignored."""
    if prior["class_prompt"] is not None:
        if not prior["class_prompt"].strip():
            raise ValueError(f"{source}: prior.class_prompt={prior['class_prompt']!r} must be a non-empty prompt, "
                             f"or null for no prior preservation")
        return
    for key, value in prior.items():
        if key != "class_prompt" and value != SCHEMA["prior"][key][1]:
            raise ValueError(f"{source}: prior.{key}={value!r} is given but prior.class_prompt is null (no prior "
                             f"preservation, so it would be ignored); set prior.class_prompt or remove prior.{key}")


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a DreamBooth recipe file, apply dotted overrides (``train.steps=2``), validate."""
    return validate(apply_overrides(read_yaml(path), list(overrides)), source=str(path))
