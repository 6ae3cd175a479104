"""α-LoRA's bi-level update in the recipe runner (the paper's Algorithm 1), from two recipe keys.

With ``data.alpha_holdout`` (a fraction of the training split, held out from it) the α vectors leave the adapter's
optimizer: every ``adapter.options.alpha_every`` optimizer steps, one step of their own Adam
(``adapter.options.alpha_lr``) on a held-out batch. The held-out batch of the k-th α step is a function of
(seed, k), so a resumed run draws the same ones.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, default_collate

METHOD = "alpha-lora"


def split_holdout(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, held out): a seeded ``fraction`` of the images held out, each part in its original order."""
    size = len(dataset)
    held = math.ceil(fraction * size)
    if not 0 < held < size:
        raise ValueError(f"data.alpha_holdout={fraction!r} of {size} training images leaves no image on one side")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    train, holdout = Subset(dataset, sorted(order[held:])), Subset(dataset, sorted(order[:held]))
    train.num_classes = holdout.num_classes = dataset.num_classes
    return train, holdout


class AlphaSteps:
    """α's own Adam and its schedule; ``run`` after each optimizer step of the adapter."""

    def __init__(self, raw_model, holdout: Dataset, options: dict[str, Any], batch_size: int, seed: int) -> None:
        from visionpeft.methods.alpha_lora import AlphaLoRA, alpha_parameters

        self.every = options.get("alpha_every", AlphaLoRA.options["alpha_every"].default)
        lr = options.get("alpha_lr", AlphaLoRA.options["alpha_lr"].default)
        self.params = list(alpha_parameters(raw_model).values())
        if not self.params:
            raise ValueError("data.alpha_holdout is set but the model has no alpha-lora adapter")
        self.optimizer = torch.optim.Adam(self.params, lr=lr)
        self.holdout, self.seed = holdout, seed
        self.batch_size = min(batch_size, len(holdout))

    def ids(self) -> set[int]:
        """The α parameters, which the adapter's optimizer must not get."""
        return {id(p) for p in self.params}

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out batch of the k-th α step (k >= 1): epochs of seeded permutations."""
        per_epoch = len(self.holdout) // self.batch_size
        epoch, position = divmod(k - 1, per_epoch)
        order = torch.randperm(len(self.holdout), generator=torch.Generator().manual_seed(self.seed * 100_003 + 7919 + epoch))
        chosen = order[position * self.batch_size:(position + 1) * self.batch_size].tolist()
        return default_collate([self.holdout[i] for i in chosen])

    def run(self, model, accelerator, step: int, label_smoothing: float, adapter_optimizer) -> float | None:
        """One α step on a held-out batch when ``step`` is a multiple of ``alpha_every``; its loss, else None."""
        if step % self.every:
            return None
        images, labels = (t.to(accelerator.device) for t in self.batch(step // self.every))
        self.optimizer.zero_grad(set_to_none=True)  # drops what the adapter's backward left on α
        loss = F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)
        accelerator.backward(loss * accelerator.gradient_accumulation_steps)  # accelerate divides by it
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        adapter_optimizer.zero_grad(set_to_none=True)  # the held-out batch must not reach the adapter
        return accelerator.gather(loss.detach()[None]).mean().item()
