"""Model families and their default targets: every adaptable weight inside the repeated blocks
(transformer blocks, UNet down/mid/up blocks, decoder layers), never heads, embeddings or norms.
A stage's stride-2 convs belong to it (a ResNet's downsample, a ConvNeXt's stage entry, a UNet's
downsamplers); the stem that turns pixels into the first feature map is an embedding and stays out.

A family is recognised from the model's class and the module names it holds, never from weights.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

from torch import nn


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    detect: Callable[[nn.Module, set[str]], bool]
    blocks: str  # regular expression: the qualified names inside the repeated blocks

    def targets(self, qualified_name: str) -> bool:
        return re.fullmatch(self.blocks, qualified_name) is not None


def _class_path(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__name__}"


def _from(package: str, *class_names: str) -> Callable[[nn.Module, set[str]], bool]:
    def detect(model: nn.Module, names: set[str]) -> bool:
        path = _class_path(model)
        return path.startswith(package + ".") and (not class_names or type(model).__name__ in class_names)

    return detect


def _has(package: str, pattern: str) -> Callable[[nn.Module, set[str]], bool]:
    regex = re.compile(pattern)

    def detect(model: nn.Module, names: set[str]) -> bool:
        return _class_path(model).startswith(package + ".") and any(regex.fullmatch(n) for n in names)

    return detect


FAMILIES: tuple[Family, ...] = (
    Family("timm VisionTransformer", _from("timm", "VisionTransformer", "Eva", "VisionTransformerDistilled"),
           r"blocks\.\d+\..+"),
    Family("timm ConvNeXt", _from("timm", "ConvNeXt"), r"stages\.\d+\.(blocks\.\d+|downsample)\..+"),
    Family("timm ResNet", _from("timm", "ResNet"), r"layer\d+\.\d+\..+"),
    Family("open_clip CLIP", _from("open_clip", "CLIP", "CustomTextCLIP"),
           r"(visual\.)?transformer\.resblocks\.\d+\..+|text\.transformer\.resblocks\.\d+\..+"),
    Family("open_clip vision tower", _from("open_clip", "VisionTransformer"), r"transformer\.resblocks\.\d+\..+"),
    Family("transformers CLIP", _from("transformers", "CLIPModel", "CLIPTextModel", "CLIPVisionModel",
                                      "CLIPTextModelWithProjection", "CLIPVisionModelWithProjection"),
           r"(.+\.)?encoder\.layers\.\d+\..+"),
    Family("diffusers UNet", _from("diffusers", "UNet2DConditionModel", "UNet2DModel"),
           r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\..+"),
    Family("transformers GPT-2", _has("transformers", r"transformer\.h\.\d+\..+|h\.\d+\..+"),
           r"(transformer\.)?h\.\d+\..+"),
    Family("transformers decoder LM", _has("transformers", r"(.+\.)?layers\.\d+\..+"),
           r"(.+\.)?layers\.\d+\..+"),
)


def detect_family(model: nn.Module) -> Family | None:
    names = {name for name, _ in model.named_modules()}
    for family in FAMILIES:
        if family.detect(model, names):
            return family
    return None


def family_names() -> list[str]:
    return [f.name for f in FAMILIES]
