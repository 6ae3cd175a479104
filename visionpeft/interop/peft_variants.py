"""How each visionpeft method maps onto PEFT's LoRA layout: one :class:`PeftVariant` per method, by name.

A variant says which config fields it sets (``use_dora``), whether a PEFT config is its own, and which per-layer
tensors it writes and reads (key suffixes after ``base_model.model.<layer>.``):

- ``lora``: ``lora_A.weight`` (rank × fan_in; a conv's the k×k down conv ``(rank, in, *kernel)``) and
  ``lora_B.weight`` (out × rank; a conv's the 1×1 up conv ``(out, rank, 1, ...)``), copied as they are: PEFT's
  ΔW = scale · B·A with scale = lora_alpha / r is LoRA's.
- ``dora``: LoRA's factors and ``lora_magnitude_vector``, the magnitude m with one value per output channel,
  shaped ``(out,)`` for a linear layer and ``(1, out, 1, ...)`` for a conv, as PEFT stores it (the key is the
  module's parameter name ``lora_magnitude_vector.<adapter>.weight`` with adapter name and ``.weight`` dropped).
  PEFT's DoRA, W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row with the norm detached, is visionpeft's, so m copies as
  it is. (In training with dropout PEFT also drops the input of its (g − 1) ⊙ W0·x term; without dropout, and in
  evaluation, the two are the same.)
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

MAGNITUDE = "lora_magnitude_vector"


class PeftVariant:
    """How one visionpeft method reads and writes PEFT's LoRA layout (the plain variant: ``lora``)."""

    method: ClassVar[str] = "lora"

    def config(self, record) -> dict[str, Any]:
        """Config fields of this variant (beyond r, lora_alpha, target_modules, ...)."""
        return {"use_dora": False}

    def accepts(self, config: dict[str, Any]) -> bool:
        """Whether a PEFT config is this variant's."""
        return not config.get("use_dora", False)

    def tensors(self, method: nn.Module, slot) -> dict[str, torch.Tensor]:
        """Per layer, ``{key suffix: tensor}`` in PEFT's layout."""
        down, up, scale = method.factors()
        spatial = (1,) * (len(slot.shape) - 2)
        return {"lora_A.weight": down.reshape(method.rank, *slot.shape[1:]),
                "lora_B.weight": up.reshape(slot.shape[0], method.rank, *spatial)}

    def suffixes(self) -> tuple[str, ...]:
        return ("lora_A.weight", "lora_B.weight")

    def rank(self, tensors: dict[str, torch.Tensor]) -> int:
        return tensors["lora_A.weight"].shape[0]

    def load(self, method: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Fill an off-model instance from the file's tensors; ValueError for one that does not fit."""
        method.set_factors(tensors["lora_A.weight"], tensors["lora_B.weight"], float(method.scale))


class DoraVariant(PeftVariant):
    """PEFT's ``use_dora``: LoRA's factors plus the magnitude vector."""

    method = "dora"

    def config(self, record) -> dict[str, Any]:
        return {"use_dora": True}

    def accepts(self, config: dict[str, Any]) -> bool:
        return bool(config.get("use_dora", False))

    @staticmethod
    def magnitude_shape(slot_shape: tuple[int, ...]) -> tuple[int, ...]:
        """PEFT's magnitude shape for a weight of ``slot_shape``: (out,), or (1, out, 1, ...) for a conv."""
        if len(slot_shape) == 2:
            return (slot_shape[0],)
        return (1, slot_shape[0], *(1,) * (len(slot_shape) - 2))

    def tensors(self, method: nn.Module, slot) -> dict[str, torch.Tensor]:
        return {**super().tensors(method, slot),
                MAGNITUDE: method.magnitude.detach().reshape(self.magnitude_shape(tuple(slot.shape)))}

    def suffixes(self) -> tuple[str, ...]:
        return (*super().suffixes(), MAGNITUDE)

    def load(self, method: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        values = tensors[MAGNITUDE]
        expected = self.magnitude_shape(method.slot_shape)
        if tuple(values.shape) != expected:
            raise ValueError(f"{MAGNITUDE} has shape {tuple(values.shape)}; this layer's weight "
                             f"{method.slot_shape} needs {expected} (one value per output channel)")
        super().load(method, tensors)
        method.set_magnitude(values)


VARIANTS: dict[str, PeftVariant] = {}


def register_variant(variant: PeftVariant) -> PeftVariant:
    VARIANTS[variant.method] = variant
    return variant


register_variant(PeftVariant())
register_variant(DoraVariant())
