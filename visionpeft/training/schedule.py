"""When a run does what: the learning-rate schedule, the data order of each epoch, and how many optimizer
updates an epoch holds."""
from __future__ import annotations

import math

import torch


def lr_lambda(lr: float, warmup_lr: float, min_lr: float, warmup_steps: int, total_steps: int):
    """Linear warm-up from warmup_lr to lr, then cosine to min_lr (as a factor of lr, for LambdaLR)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (warmup_lr + (lr - warmup_lr) * step / warmup_steps) / lr
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))) / lr

    return factor


class EpochOrder(torch.utils.data.Sampler):
    """A permutation drawn from (seed, epoch): the same on every process and after a resume."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def check_batch_fits(images: int, batch_size: int, where: str) -> None:
    """Full batches only (``drop_last``): fewer images than one batch would give an epoch without a step."""
    if images < batch_size:
        raise ValueError(f"train.batch_size={batch_size} is larger than the {images} training images of {where}; "
                         f"use train.batch_size <= {images}")


def updates_per_epoch(batches: int, grad_accum: int) -> int:
    """Optimizer updates in one pass over ``batches`` micro-batches: whole accumulations, and at least one
    (accelerate ends an accumulation at the end of the data)."""
    if batches < 1:
        raise ValueError(f"an epoch holds {batches} batches: nothing to train on")
    return max(1, batches // grad_accum)
