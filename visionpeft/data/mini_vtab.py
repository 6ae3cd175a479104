"""Mini VTAB-1k: small downstream tasks generated offline into the VTAB-1k on-disk format.

- ``digits``: scikit-learn's bundled handwritten digits (real data, 10 classes), 8×8 scans upsampled
  to 32×32 grey RGB; 1000 labelled training images and the other 797 as the test set.
- ``orientation`` (8), ``location`` (16), ``counting`` (6): procedural structured tasks from
  :mod:`visionpeft.data.procedural` whose labels the tiny backbones never saw in pretraining
  (an arrow's heading, a fine position grid, counting red circles among distractors); 1000 training
  and 1000 test images each.

Each task folder holds the four VTAB-1k list files (train800, val200, train800val200, test) and
``task.json`` (classes, description, seed), which the VTAB-1k loader reads for tasks outside the
official nineteen. A task is written into a temporary folder and renamed into place, so a folder
that exists is complete; an existing task generated with the same seed is kept.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from visionpeft.data import procedural
from visionpeft.data.writers import write_vtab_task

IMAGE_SIZE = 32
TRAIN, VALIDATION = 800, 200

# The recipes (``recipes/mini_vtab``) hold the tiny ViT's choices; where a backbone's own choices differ,
# they are recipe overrides. Learning rates: ``benchmarks/mini_vtab.py --tune-lr`` on train800 -> val200
# (``benchmarks/results/mini_vtab_lr_convnet_cpu.md``; linear 0.1 and lora 1e-2 are the ViT's too).
BACKBONE_LR: dict[str, dict[str, float]] = {
    "convnet": {"full": 3e-3, "flora": 1e-2, "snella": 3e-2, "sara": 0.1, "svd": 0.3},
}
# Layers every adapter gets beyond the family preset. The ConvNeXt's 2x2 stride-2 stem (1.5k weights) is
# its patch embedding, which presets leave out; on the mini tasks it decides the spatial ones (train800 ->
# val200, seed 0, LoRA r4: location 84.5 -> 90.0 with it, full fine-tuning 89.5).
BACKBONE_TARGETS: dict[str, str] = {
    "convnet": r"stem\.0|stages\.\d+\.(blocks\.\d+|downsample)\..+",
}
#: the outside peers' recipes, which take the rate of the visionpeft method they are compared with
PEER_OF = {"peft-lora": "lora", "peft-dora": "dora"}


def backbone_overrides(method: str, backbone: str) -> list[str]:
    """Recipe overrides that put ``method``'s mini VTAB recipe on the tiny ``backbone``: the model, and that
    backbone's own learning rate and targets where they differ from the recipe's (PEFT's LoRA and DoRA take
    visionpeft LoRA's and DoRA's)."""
    overrides = [f"model.name=visionpeft/tiny_{backbone}"]
    lr = BACKBONE_LR.get(backbone, {}).get(PEER_OF.get(method, method))
    if lr is not None:
        overrides.append(f"train.lr={lr}")
    targets = BACKBONE_TARGETS.get(backbone)
    if targets is not None and method not in ("linear", "full"):
        overrides.append(f"adapter.targets={targets}")
    return overrides


def digits(seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, test) of scikit-learn's digits as uint8 N×32×32×3 images and labels; a seeded split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    scans = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = torch.nn.functional.interpolate(scans, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    images = procedural.to_uint8(images.repeat(1, 3, 1, 1)).numpy()
    order = np.random.default_rng(seed).permutation(len(images))
    train, test = order[:TRAIN + VALIDATION], order[TRAIN + VALIDATION:]
    return (images[train], data.target[train]), (images[test], data.target[test])


def _procedural(task: Callable) -> Callable:
    def generate(seed: int):
        train_images, train_labels = task(TRAIN + VALIDATION, seed=2 * seed + 1, size=IMAGE_SIZE)
        test_images, test_labels = task(1000, seed=2 * seed + 2, size=IMAGE_SIZE)
        return ((procedural.to_uint8(train_images).numpy(), train_labels.numpy()),
                (procedural.to_uint8(test_images).numpy(), test_labels.numpy()))

    return generate


#: task -> (number of classes, generator(seed) -> ((train images, labels), (test images, labels)), description)
MINI_TASKS: dict[str, tuple[int, Callable, str]] = {
    "digits": (10, digits, "scikit-learn handwritten digits (real scans, 8x8 upsampled to 32x32)"),
    "orientation": (8, _procedural(procedural.orientation_task), "heading of one arrow, 8 sectors"),
    "location": (16, _procedural(procedural.location_task), "cell of a small object in a 4x4 grid, among ring distractors"),
    "counting": (6, _procedural(procedural.counting_task), "number of red circles (1-6) among distractors"),
}


def _is_current(folder: Path, seed: int) -> bool:
    described = folder / "task.json"
    if not described.is_file():
        return False
    try:
        return json.loads(described.read_text()).get("seed") == seed
    except json.JSONDecodeError:
        return False


def write_task(root: str | Path, task: str, seed: int = 0) -> Path:
    """Generate one mini task under ``root`` (kept if it already exists with this seed)."""
    if task not in MINI_TASKS:
        raise ValueError(f"unknown mini VTAB task {task!r}; tasks: {', '.join(MINI_TASKS)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    root = Path(root)
    folder = root / task
    if _is_current(folder, seed):
        return folder
    classes, generate, description = MINI_TASKS[task]
    (train_x, train_y), (test_x, test_y) = generate(seed)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{task}."))
    try:
        write_vtab_task(staging, task, {
            "train800": (train_x[:TRAIN], train_y[:TRAIN]),
            "val200": (train_x[TRAIN:], train_y[TRAIN:]),
            "train800val200": (train_x, train_y),
            "test": (test_x, test_y),
        })
        (staging / task / "task.json").write_text(json.dumps(
            {"num_classes": classes, "description": description, "seed": seed, "image_size": IMAGE_SIZE,
             "train": len(train_y), "test": len(test_y)}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        (staging / task).rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write_mini_vtab(root: str | Path, tasks: list[str] | None = None, seed: int = 0) -> Path:
    """Generate the mini tasks (all by default) under ``root``; returns ``root``."""
    tasks = list(MINI_TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in MINI_TASKS]
    if unknown:
        raise ValueError(f"unknown mini VTAB task(s) {unknown}; tasks: {', '.join(MINI_TASKS)}")
    for task in tasks:
        write_task(root, task, seed)
    return Path(root)
