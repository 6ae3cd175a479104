"""The benchmark lineages' preprocessing (set explicitly: timm's defaults use other statistics).

- ``none`` (VTAB-1k): direct bicubic resize of the whole image to size×size, ImageNet mean/std.
- ``vpt`` (FGVC, VPT): train resize 256 + random crop 224 + flip; eval resize 256 + center crop 224.
- ``ssf`` (FGVC, SSF/SNELL): train timm RandomResizedCrop + flip + color jitter 0.4; eval resize 256 + center crop.
"""
from __future__ import annotations

from typing import Callable, Sequence

from torchvision import transforms as T


def build_transform(augmentation: str, image_size: int, mean: Sequence[float], std: Sequence[float],
                    train: bool) -> Callable:
    normalize = [T.ToTensor(), T.Normalize(list(mean), list(std))]
    bicubic = T.InterpolationMode.BICUBIC
    resize = int(round(image_size / 0.875))
    if augmentation == "none":
        return T.Compose([T.Resize((image_size, image_size), interpolation=bicubic)] + normalize)
    if not train:
        return T.Compose([T.Resize(resize), T.CenterCrop(image_size)] + normalize)
    if augmentation == "vpt":
        return T.Compose([T.Resize(resize), T.RandomCrop(image_size), T.RandomHorizontalFlip()] + normalize)
    if augmentation == "ssf":
        from timm.data import create_transform

        return create_transform(image_size, is_training=True, mean=tuple(mean), std=tuple(std),
                                interpolation="bicubic", color_jitter=0.4, auto_augment=None, re_prob=0.0)
    raise ValueError(f"augmentation {augmentation!r} is not one of none, vpt, ssf")
