"""α-LoRA (El Firdoussi et al., 2025): h = α ⊙ (W0·x + b) + s·B(A·x), a learned rescaling of the frozen layer.

α (``base_scale``, one value per output channel) starts at 1 and B at zero, so attaching changes nothing; A, B,
s and the options ``rank``, ``alpha``, ``dropout``, ``rslora`` are LoRA's. ``scale_bias`` (default True, as in
the reference code) scales the bias with the base output; False gives α ⊙ W0·x + b. The paper trains α apart from
the adapter (its Algorithm 1): every ``alpha_every`` steps (option, default 10), one step of its own Adam
(``alpha_lr``, default 5e-3) on a batch from a held-out split. :func:`alpha_parameters` and
:func:`adapter_parameters` split a model's trainable parameters for such a loop (README, Methods); the two options
are recorded with the adapter for the loop to read (``vp.adapters(model)[name]["options"]``).

Paths: on linear ops and convs (any groups) the layer runs its base op and this adapter scales the output in place
(``methods/decomposed.py``'s gain, which keeps only the output for backward) and adds LoRA's fused branch. Where
the op cannot be reached from outside (MultiheadAttention, modules with their own forward) the weight path runs
α ⊙ W0 + s·B·A, and the bias inside the op stays unscaled; so it does while another adapter acts on the same slot
of a linear op or conv (the layer then takes the weight path), though merging scales that bias as the layer alone
would. Merging folds the weight in, and the bias scale into the bias of linear ops and convs; unmerging divides the
weight's rows by 1 + scale·(α − 1) (a row with α = 1 − 1/scale cannot be recovered) and restores the bias.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from visionpeft.layers.adapted import ADAPTERS_ATTR
from visionpeft.layers.kinds import Slot
from visionpeft.methods.base import Option, adapter_dtype, boolean, positive_int, register
from visionpeft.methods.decomposed import LOW_RANK_OPTIONS, NormalizedLowRank, apply_gain


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@register
class AlphaLoRA(NormalizedLowRank):
    name = "alpha-lora"
    options = {
        **LOW_RANK_OPTIONS,
        "scale_bias": Option(True, boolean, "True or False", "α scales the bias with the base output"),
        "alpha_every": Option(10, positive_int, "an int >= 1", "train steps between two steps of α (bi-level loop)"),
        "alpha_lr": Option(5e-3, _positive_number, "a number > 0", "learning rate of α's own Adam"),
    }

    def __init__(self, slot: Slot, rank: int, alpha: float | None, dropout: float, rslora: bool,
                 scale_bias: bool, alpha_every: int, alpha_lr: float) -> None:
        super().__init__(slot, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora)
        self.config.update(scale_bias=scale_bias, alpha_every=alpha_every, alpha_lr=alpha_lr)
        self.scale_bias = scale_bias
        self.base_scale = nn.Parameter(torch.ones(slot.out_features, dtype=adapter_dtype(slot.dtype), device=slot.device))
        self.register_buffer("unmerged_bias", None, persistent=False)

    def uses_activation_path(self, slot: Slot) -> bool:
        return slot.op in ("linear", "conv")

    def add_output_delta(self, x: torch.Tensor, out: torch.Tensor, slot: Slot, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
        scaled = apply_gain(out, self.base_scale, None if self.scale_bias else bias, self.channel_dim(slot))
        return self.add_branch(x, scaled, slot, self.scale)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """(α − 1) ⊙ W0 + s·B·A for the layer's weight W0 (rows are output channels)."""
        rows = weight.reshape(weight.shape[0], -1).to(self.base_scale.dtype)
        return ((self.base_scale - 1)[:, None] * rows + self.low_rank()).view(self.slot_shape)

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta(weight).to(weight.dtype)

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return weight.float() + scale * self.delta(weight).float()

    @torch.no_grad()
    def unmerged_weight(self, merged: torch.Tensor, scale: float) -> torch.Tensor:
        """W0 from W0 + scale·((α − 1) ⊙ W0 + s·B·A)."""
        rows = merged.reshape(merged.shape[0], -1).float() - scale * self.low_rank().float()
        return (rows / (1 + scale * (self.base_scale.float() - 1))[:, None]).view(self.slot_shape)

    def effective_bias(self, bias: torch.Tensor, slot: Slot) -> torch.Tensor:
        """The bias as the activation path applies it (b ⊙ α), for a layer whose weight and bias an enclosing module
        reads directly (layers/direct_reads.py)."""
        if not (self.scale_bias and self.uses_activation_path(slot)):
            return bias
        return bias * self.base_scale.to(bias.dtype)

    @torch.no_grad()
    def folded_bias(self, bias: torch.Tensor, slot: Slot, scale: float, merge: bool) -> torch.Tensor:
        """The bias after merging (b ⊙ (1 + scale·(α − 1))) or unmerging (b as it was before the merge)."""
        if not (self.scale_bias and self.uses_activation_path(slot)):
            return bias
        if merge:
            self.unmerged_bias = bias.detach().clone()
            return (bias.float() * (1 + scale * (self.base_scale.float() - 1))).to(bias.dtype)
        original, self.unmerged_bias = self.unmerged_bias, None
        return original


def alpha_parameters(model: nn.Module, names: str | list[str] | None = None) -> dict[str, nn.Parameter]:
    """The α vectors (``base_scale``) of the model's α-LoRA adapters (``names``: only these adapters), by
    qualified parameter name: what α's own optimizer should get."""
    wanted = None if names is None else ({names} if isinstance(names, str) else set(names))
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, AlphaLoRA):
            parts = name.split(".")
            adapter = parts[parts.index(ADAPTERS_ATTR) + 1]  # <layer>.vp_adapters.<adapter>.<slot>
            if wanted is None or adapter in wanted:
                found[f"{name}.base_scale"] = module.base_scale
    return found


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable parameter but the α vectors: what the adapter's optimizer should get."""
    alphas = {id(p) for p in alpha_parameters(model).values()}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in alphas}
