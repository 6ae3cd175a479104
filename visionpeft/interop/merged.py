"""Exports for adapters of any method: the merged model as a diffusers/transformers checkpoint, or a LoRA fitted to
the adapter's weight change with ``vp.extract`` (truncated SVD) and written as a diffusers LoRA file.

The originals are never changed: each export works on deep copies (``vp.detach`` of a copy, with or without
merging, gives the tuned or the base weights).
"""
from __future__ import annotations

import copy
import inspect
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from visionpeft.interop.diffusers_lora import LoraFactors, check_lora_target, lora_factors, to_state_dict, write_lora_file


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every adapter folded into its weights and the original classes back."""
    import visionpeft as vp

    return vp.detach(copy.deepcopy(model), merge=True)


def base_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without its adapters (merged ones taken out again)."""
    import visionpeft as vp

    return vp.detach(copy.deepcopy(model), merge=False)


def save_merged(model_or_pipeline, directory: str | os.PathLike) -> Path:
    """``save_pretrained`` of the merged UNet (a model) or of the whole pipeline with merged UNet and text encoder,
    into ``directory`` (written to a staging folder and renamed; an existing non-empty ``directory`` is refused)."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(f"cannot save the merged model into {str(directory)!r}: it exists and is not an empty folder")
    if hasattr(model_or_pipeline, "components"):
        components = dict(model_or_pipeline.components)
        for key in ("unet", "text_encoder"):
            if components.get(key) is not None:
                components[key] = merged_copy(components[key])
        cls = type(model_or_pipeline)
        if "requires_safety_checker" in inspect.signature(cls.__init__).parameters:  # keep the saved config's choice
            components["requires_safety_checker"] = bool(getattr(model_or_pipeline.config, "requires_safety_checker", False))
        merged = cls(**components)
    elif hasattr(model_or_pipeline, "save_pretrained"):
        merged = merged_copy(model_or_pipeline)
    else:
        raise ValueError(f"save_merged needs a diffusers pipeline or a model with save_pretrained, "
                         f"got {type(model_or_pipeline).__name__}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        merged.save_pretrained(staging)
        if directory.exists():
            directory.rmdir()
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def lora_approximation(model: nn.Module, rank: int) -> tuple[dict[str, LoraFactors], dict[str, float]]:
    """LoRA factors of rank ``rank`` fitted by ``vp.extract`` to every Linear/Conv weight the adapters changed, and
    each layer's relative error ‖ΔW − ΔŴ‖/‖ΔW‖. Changes to biases and norms (SaRA ``targets="all"``, SVD
    ``train_bias``) have no LoRA form and are left out."""
    import visionpeft as vp
    from visionpeft.layers.kinds import kind_of

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank={rank!r} must be an int >= 1")
    base, tuned = base_copy(model), merged_copy(model)
    tuned_modules = dict(tuned.named_modules())
    targets = []
    for name, module in base.named_modules():
        kind = kind_of(module)
        if not name or kind is None or kind.name not in ("Linear", "Conv") or getattr(module, "groups", 1) != 1:
            continue
        if not torch.equal(module.weight, tuned_modules[name].weight):
            targets.append(name)
    if not targets:
        raise ValueError(f"the adapters of this {type(model).__name__} change no Linear or Conv weight; "
                         f"there is nothing a LoRA can approximate")
    vp.extract(base, tuned, "lora", targets=targets, rank=rank)
    from visionpeft.core import records

    return lora_factors(base), dict(records(base)["default"].reconstruction_error)


def export_lora_approximation(path: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None, *,
                              rank: int = 16, fmt: str = "diffusers") -> dict[str, float]:
    """Write a diffusers LoRA file approximating the adapters of ``unet`` (and ``text_encoder``) of any method;
    returns the per-layer relative errors (``"unet:<layer>:weight"``). A LoRA adapter is exported exactly by
    :func:`~visionpeft.interop.diffusers_lora.export_lora` instead."""
    from visionpeft.core import records

    check_lora_target(path, fmt)  # before the copies and SVDs
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank={rank!r} must be an int >= 1")
    if not records(unet):
        raise ValueError("the unet carries no visionpeft adapter to approximate")
    components, errors = {}, {}
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is None or not records(model):
            continue
        components[component], layer_errors = lora_approximation(model, rank)
        errors.update({f"{component}:{k}": v for k, v in layer_errors.items()})
    write_lora_file(path, to_state_dict(components, fmt))
    return errors


__all__ = ["merged_copy", "base_copy", "save_merged", "lora_approximation", "export_lora_approximation"]
