"""Tiny backbones pretrained by the project, shipped in the package: ``tiny("vit")``, ``tiny("convnet")``.

Both are timm models (a ViT and a ConvNeXt) for 32×32 RGB inputs normalised with mean = std = 0.5,
pretrained by ``examples/pretrain_tiny.py`` on procedurally generated scenes
(:mod:`visionpeft.data.procedural`). The trunk weights live in ``visionpeft/models/weights`` as
safetensors; the classifier head is new (``num_classes`` outputs) and always randomly initialised.
Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("weights")
IMAGE_SIZE = 32
MEAN = STD = (0.5, 0.5, 0.5)

#: name -> timm constructor keyword arguments
CONFIGS: dict[str, dict[str, Any]] = {
    "vit": dict(img_size=IMAGE_SIZE, patch_size=8, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0,
                class_token=True, global_pool="token"),
    "convnet": dict(depths=(2, 2, 4, 2), dims=(32, 64, 128, 192), patch_size=2, ls_init_value=1e-6),
}


def build_tiny(name: str, num_classes: int) -> nn.Module:
    """The architecture of a tiny backbone, randomly initialised."""
    if name not in CONFIGS:
        raise ValueError(f"unknown tiny backbone {name!r}; available: {', '.join(CONFIGS)}")
    if name == "vit":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(num_classes=num_classes, **CONFIGS[name])
    else:
        from timm.models.convnext import ConvNeXt

        model = ConvNeXt(num_classes=num_classes, **CONFIGS[name])
    model.pretrained_cfg = {"input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "mean": MEAN, "std": STD,
                            "num_classes": num_classes, "architecture": f"visionpeft/tiny_{name}"}
    return model


def weights_path(name: str) -> Path:
    return WEIGHTS / f"tiny_{name}.safetensors"


def trunk_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict except the classifier head's."""
    head = _head_prefix(model)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(head)}


def _head_prefix(model: nn.Module) -> str:
    head = model.get_classifier()
    name = next(n for n, m in model.named_modules() if m is head)
    return name + "."


def tiny(name: str = "vit", num_classes: int = 10, pretrained: bool = True) -> nn.Module:
    """A tiny pretrained backbone with a fresh ``num_classes``-way head (``pretrained=False``: random trunk)."""
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
    model = build_tiny(name, num_classes)
    if pretrained:
        from safetensors.torch import load_file

        path = weights_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} is missing: the package ships it; rebuild it with "
                                    f"`python examples/pretrain_tiny.py --backbone {name}`")
        state = {k: v.float() for k, v in load_file(str(path)).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        head = _head_prefix(model)
        missing = [k for k in missing if not k.startswith(head)]
        if missing or unexpected:
            raise ValueError(f"{str(path)!r} does not fit tiny {name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def pretraining_record(name: str) -> dict[str, Any]:
    """How the shipped weights were made (steps, seed, time, held-out accuracy per label family)."""
    from safetensors import safe_open

    with safe_open(str(weights_path(name)), "pt") as fh:
        return json.loads(fh.metadata().get("pretraining", "{}"))
