"""MAP (Si et al., 2025), over LoRA ("LoMAP"): W' = a · W0/‖W0‖_F + b · ΔW/‖ΔW‖_F with ΔW = s·B·A.

The whole weight is one vector: its pretrained direction keeps a trainable length ``base_scale`` a (starting at
‖W0‖_F) and the update contributes a unit direction of trainable length ``update_scale`` b (starting at 1).
This is the form of the reference implementation (LoMAP in the Subspace-Tuning fork): neither norm detached,
‖ΔW‖_F clamped below at 1e-6. The reference clamps ‖W0‖_F too; here a zero base weight (‖W0‖_F = 0), which has
no direction, is refused instead. B starts at zero, so attaching changes nothing. Options as LoRA's (``rank``,
``alpha``, ``dropout`` on the branch's input, ``rslora``), plus ``beta_init``, the starting b (the reference's
``map_beta_init``, default 1 as there).

While ΔW ≈ 0 (at the start, B = 0) the clamp holds ‖ΔW‖ at 1e-6, so the update's gradient reaches B amplified
by b/1e-6 ≈ 10⁶. Adam-type optimizers normalise that away (the first step moves each entry of B by about the
learning rate); plain SGD would take a huge first step. Once ‖ΔW‖_F > 1e-6 the update's norm is exactly |b|
whatever the factors' size, so b alone sets how far W moves (relative to ‖W0‖_F); b = 0 would stop A, B and b
from training at all, hence ``beta_init`` > 0. So from the first optimizer step every adapted layer carries an
update of Frobenius norm b0 along a direction that is still mostly the random A's, a fixed move whatever the
learning rate: about 10% of ‖W0‖_F for a typical layer of the tiny backbones, but as much as the whole weight on
a small one (a ConvNeXt stem of ‖W0‖_F ≈ 1, depthwise kernels of ≈ 2). A smaller ``beta_init`` starts that move
smaller; b then grows at the optimizer's pace.

‖ΔW‖_F comes from the factors, s·√tr((BᵀB)(AAᵀ)) (two r×r products), so the activation path builds no dense
ΔW: y = c·(W0·x + (b·s/(c·‖ΔW‖)) · B(A·x)) + bias with c = a/‖W0‖_F, LoRA's fused branch and a scalar gain
(``methods/decomposed.py``). ‖W0‖_F is fixed at attach (a non-persistent buffer). Grouped convs and
MultiheadAttention take the weight path, W0 + (c − 1)·W0 + b·ΔW/‖ΔW‖; merging folds that in and unmerging
divides it out again.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from visionpeft.layers.kinds import Slot
from visionpeft.methods.base import Option, adapter_dtype, register
from visionpeft.methods.decomposed import LOW_RANK_OPTIONS, NormalizedLowRank, apply_gain

#: the lower clamp of ‖ΔW‖_F (the reference's eps)
EPS = 1e-6


def _finite_positive(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


@register
class MAP(NormalizedLowRank):
    name = "map"
    options = {**LOW_RANK_OPTIONS,
               "beta_init": Option(1.0, _finite_positive, "a finite number > 0",
                                   "starting length b of the update's unit direction")}

    def __init__(self, slot: Slot, rank: int, alpha: float | None, dropout: float, rslora: bool,
                 beta_init: float = 1.0, base_norm: float | None = None) -> None:
        super().__init__(slot, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora)
        if base_norm is None:
            raise ValueError("map needs the base weight's Frobenius norm (computed by MAP.prepare)")
        dtype = adapter_dtype(slot.dtype)
        norm = torch.tensor(base_norm, dtype=dtype, device=slot.device)
        self.register_buffer("base_norm", norm, persistent=False)
        self.base_scale = nn.Parameter(norm.clone())
        self.update_scale = nn.Parameter(torch.full((), float(beta_init), dtype=dtype, device=slot.device))

    @classmethod
    def prepare(cls, slots, options):
        per_slot = []
        for label, _, weight in slots:
            norm = float(weight.detach().double().norm())
            if not norm > 0:
                raise ValueError(f"map on {label}: the base weight has ‖W0‖_F = {norm}; MAP needs a non-zero weight "
                                 f"to take its direction")
            per_slot.append(dict(options, base_norm=norm))
        return per_slot

    def base_gain(self) -> torch.Tensor:
        """c = a/‖W0‖_F (exactly 1 at attach)."""
        return self.base_scale / self.base_norm

    def update_gain(self) -> torch.Tensor:
        """b/max(‖ΔW‖_F, eps) with ‖ΔW‖_F = s·√tr((BᵀB)(AAᵀ)), from the factors."""
        down, up = self.lora_A, self.lora_B
        trace = ((up.t() @ up) * (down @ down.t())).sum()
        return self.update_scale / (self.scale * trace.clamp_min(0).sqrt()).clamp_min(EPS)

    def _update(self) -> torch.Tensor:
        return (self.update_gain() * self.low_rank()).view(self.slot_shape)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """(c − 1)·W0 + b·ΔW/‖ΔW‖_F for the layer's weight W0."""
        return (self.base_gain() - 1) * weight.to(self.base_scale.dtype) + self._update()

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta(weight).to(weight.dtype)

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return weight.float() + scale * self.delta(weight).float()

    @torch.no_grad()
    def unmerged_weight(self, merged: torch.Tensor, scale: float) -> torch.Tensor:
        """W0 from W0 + scale·((c − 1)·W0 + b·ΔW/‖ΔW‖_F)."""
        c = float(self.base_gain())
        return (merged.float() - scale * self._update().float()) / (1 + scale * (c - 1))

    def add_output_delta(self, x: torch.Tensor, out: torch.Tensor, slot: Slot, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
        c = self.base_gain()
        branch = self.add_branch(x, out, slot, self.update_gain() * self.scale / c)
        return apply_gain(branch, c, bias, self.channel_dim(slot))
