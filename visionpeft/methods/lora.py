"""LoRA (Hu et al., 2021): ΔW = (alpha/rank) · B A, with A (rank × fan_in) and B (out × rank).

A starts Kaiming-uniform and B at zero, so attaching changes nothing. On linear ops and ungrouped
convs the adapter runs on activations (x → A → B, fused with the base output in one addmm, so no
full-size weight or extra output-size temporary is built); a grouped conv and
MultiheadAttention use the weight path W + ΔW, which is exact where the activation path is not.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from visionpeft.layers.kinds import Slot
from visionpeft.methods.base import (
    Method, Option, adapter_dtype, boolean, kaiming_uniform_, positive_int, positive_number_or_none, probability, register,
)
from visionpeft.methods.lowrank import add_low_rank_output


@register
class LoRA(Method):
    name = "lora"
    options = {
        "rank": Option(8, positive_int, "an int >= 1", "rank of the update"),
        "alpha": Option(None, positive_number_or_none, "a number > 0, or None for alpha = rank", "scale numerator"),
        "dropout": Option(0.0, probability, "a float in [0, 1)", "dropout on the adapter's input"),
        "rslora": Option(False, boolean, "True or False", "scale by alpha/sqrt(rank) instead of alpha/rank"),
    }

    def __init__(self, slot: Slot, rank: int, alpha: float | None, dropout: float, rslora: bool) -> None:
        super().__init__(slot, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora)
        alpha = rank if alpha is None else alpha
        self.rank = rank
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        dtype = adapter_dtype(slot.dtype)
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(rank, slot.in_features, dtype=dtype, device=slot.device)))
        self.lora_B = nn.Parameter(torch.zeros(slot.out_features, rank, dtype=dtype, device=slot.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).mul_(self.scale).view(self.slot_shape)

    @torch.no_grad()
    def fit_delta(self, delta: torch.Tensor) -> None:
        """Truncated SVD: the best rank-``rank`` approximation in Frobenius norm (Eckart-Young)."""
        u, s, vh = torch.linalg.svd(delta.double().reshape(delta.shape[0], -1), full_matrices=False)
        r = min(self.rank, s.numel())
        root = (s[:r] / self.scale).sqrt()
        self.lora_B.zero_()[:, :r] = (u[:, :r] * root).to(self.lora_B.dtype)
        self.lora_A.zero_()[:r] = (root[:, None] * vh[:r]).to(self.lora_A.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(down A (rank × fan_in), up B (out × rank), scale)`` with ΔW = scale · B A (detached, not copies)."""
        return self.lora_A.detach(), self.lora_B.detach(), float(self.scale)

    @torch.no_grad()
    def set_factors(self, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        """Make ΔW = ``scale`` · up · down. ``down`` holds rank × fan_in values (a conv's may be shaped
        (rank, in, *kernel)), ``up`` out × rank (or (out, rank, 1, ...)); this adapter keeps its own scale, and
        ``scale``/``self.scale`` is folded into B."""
        rank, out = self.rank, self.lora_B.shape[0]
        if down.shape[:1] != (rank,) or down.numel() != self.lora_A.numel():
            raise ValueError(f"down factor of shape {tuple(down.shape)} does not fit lora_A {tuple(self.lora_A.shape)}")
        if up.shape[:2] != (out, rank) or up.numel() != self.lora_B.numel():
            raise ValueError(f"up factor of shape {tuple(up.shape)} does not fit lora_B {tuple(self.lora_B.shape)}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise ValueError(f"scale={scale!r} must be a finite number")
        self.lora_A.copy_(down.reshape(self.lora_A.shape))
        self.lora_B.copy_((up.reshape(self.lora_B.shape).double() * (scale / self.scale)).to(self.lora_B.dtype))

    def uses_activation_path(self, slot: Slot) -> bool:
        return slot.op == "linear" or (slot.op == "conv" and (slot.groups == 1 or self.dropout is not None))

    def low_rank_branch(self, slot: Slot) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        # subclasses that read W0 (DoRA, MAP, alpha-LoRA) transform the base output too: not a plain branch
        if slot.op != "linear" or self.reads_base or (self.dropout is not None and self.training):
            return None
        return self.lora_A, self.lora_B, self.scale

    def add_output_delta(self, x: torch.Tensor, out: torch.Tensor, slot: Slot) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        if slot.op == "conv" and slot.groups != 1:  # grouped: exact only through ΔW itself
            return out.add_(slot.run(x, self.delta().to(x.dtype)).to(out.dtype))
        return add_low_rank_output(x, out, slot, self.lora_A, self.lora_B, self.scale)
