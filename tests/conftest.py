import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import visionpeft as vp


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def perturb(model, std=0.1):
    """Give every adapter parameter a non-zero random value so that the adapter has an effect."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".vp_adapters." in f".{name}":
                param.add_(torch.randn_like(param) * std)
    return model


class RecordCalls(TorchDispatchMode):
    """Inside ``with RecordCalls(op) as record``, ``record.calls`` lists the arguments of every call to ``op``."""

    def __init__(self, op):
        super().__init__()
        self.op, self.calls = op, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is self.op:
            self.calls.append(args)
        return func(*args, **(kwargs or {}))


def max_rel(a, b):
    return ((a - b).abs().max() / (b.abs().max() + 1e-12)).item()


def roundtrip(model, tmp_path, fresh):
    """save ``model`` and load it into ``fresh``; returns ``fresh``."""
    vp.save(model, tmp_path / "adapter")
    return vp.load(fresh, tmp_path / "adapter")


def clone(model):
    return copy.deepcopy(model)


class Wrap(nn.Module):
    """A one-layer model, so that targets=["layer"] selects exactly the layer under test."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return self.layer(*args, **kwargs)


def squares(n, seed, classes=4):
    """n 32 px uint8 images of class i % classes: a yellow square in the class's quadrant on dark noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (n, 32, 32, 3), dtype=np.uint8)
    labels = [i % classes for i in range(n)]
    for image, label in zip(images, labels):
        y, x = divmod(label, 2)
        image[y * 16:(y + 1) * 16, x * 16:(x + 1) * 16] = (200, 180, 40)
    return list(images), labels


def tiny_vit_recipe(root, output, *, depth=1, method="lora", options=None, task="dsprites_loc", data=None, **train):
    """A runner recipe for a tiny timm ViT (32 px, width 32) on a VTAB-1k-layout task under ``root``: the runner
    tests' common setup; ``train`` holds each test's schedule (steps, batch, evaluation, device, ...)."""
    return {
        "model": {"name": "vit_tiny_patch16_224", "image_size": 32,
                  "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": depth, "num_heads": 2}},
        "adapter": {"method": method, "options": options or {"rank": 2}},
        "data": {"format": "vtab1k", "root": str(root), "task": task, "train_split": "train800val200", **(data or {})},
        "train": {"lr": 5e-3, **train},
        "output": str(output),
    }
