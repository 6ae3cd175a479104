"""DoRA (Liu et al., ICML 2024): W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row.

The norm is per output channel, over every other dim (a conv kernel's in/groups × kernel entries), and is
treated as a constant in backward (the paper's §4.3, as PEFT does). ``magnitude`` m (one value per output
channel) starts at ‖W0‖_row and B at zero, so attaching changes nothing; the bias is not rescaled. Options as
LoRA's: ``rank``, ``alpha``, ``dropout``, ``rslora``. Dropout acts on the low-rank branch's input only,
y = g ⊙ (W0·x + s·B·A·dropout(x)) + b; PEFT, in training with dropout, also drops the input of its
(g − 1) ⊙ W0·x term, which costs it a second base op.

Activation path (linear ops, ungrouped convs on their (out, in·k) view): no out×in tensor is built. The row
norms come from the factors, ‖W0ᵢ + s(BA)ᵢ‖² = ‖W0ᵢ‖² + 2s⟨W0ᵢ, (BA)ᵢ⟩ + s²‖(BA)ᵢ‖², where the rows of ⟨W0, BA⟩
are rowsum((W0·Aᵀ) ⊙ B) and those of ‖BA‖² rowsum((B·AAᵀ) ⊙ B): O(out·in·r). ‖W0‖²_row is a non-persistent
buffer computed at attach (recomputed when the layer's weight changes: a merge of another adapter, a load).
Then y = g ⊙ (W0·x + s·B(A·x)) + b with g = m/n: LoRA's fused branch on the base output, and a gain applied in
place whose backward keeps only the (usually already kept) output (``methods/decomposed.py``). PEFT instead
builds W0 + s·B·A densely every step and keeps output-sized tensors of its own for backward.

Weight path (grouped convs without dropout, MultiheadAttention, modules with their own forward): the op runs
with W0 + (g − 1) ⊙ W0 + g ⊙ s·B·A, exact and cheaper there than a second op on activations. Merging folds the
same ΔW into the weight; unmerging inverts it row by row with the norms cached at merge time (a row whose
magnitude is exactly 0 merges to zero and cannot be recovered).
"""
from __future__ import annotations

import torch
from torch import nn

from visionpeft.layers.kinds import Slot
from visionpeft.methods.base import adapter_dtype, register
from visionpeft.methods.decomposed import NormalizedLowRank, apply_gain, base_times, row_norms_squared


@register
class DoRA(NormalizedLowRank):
    name = "dora"

    def __init__(self, slot: Slot, rank: int, alpha: float | None, dropout: float, rslora: bool,
                 base: tuple[torch.Tensor, tuple] | None = None) -> None:
        super().__init__(slot, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora)
        if base is None:
            raise ValueError("dora needs the base weight's row norms (computed by DoRA.prepare)")
        norms_squared, self._norms_of = base  # ‖W0‖²_row, and which weight tensor they describe
        self.register_buffer("base_norms_squared", norms_squared.to(slot.device), persistent=False)
        self.register_buffer("merged_norms", None, persistent=False)
        self.magnitude = nn.Parameter(norms_squared.sqrt())

    @classmethod
    def prepare(cls, slots, options):
        return [dict(options, base=(row_norms_squared(weight, adapter_dtype(slot.dtype)), cls._identity(weight)))
                for _, slot, weight in slots]

    @staticmethod
    def _identity(weight: torch.Tensor) -> tuple:
        return weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape)

    def _base_norms_squared(self, weight: torch.Tensor, layer_weight: bool) -> torch.Tensor:
        """‖W0‖²_row of ``weight``: the cached buffer while the layer's weight is the one it was computed from."""
        if not layer_weight or torch.compiler.is_compiling():  # a compiled graph computes them (no data_ptr there)
            return row_norms_squared(weight, self.magnitude.dtype)
        identity = self._identity(weight)
        if self._norms_of != identity:
            self.base_norms_squared = row_norms_squared(weight, self.magnitude.dtype)
            self._norms_of = identity
        return self.base_norms_squared

    @torch.no_grad()
    def row_norms(self, weight: torch.Tensor, layer_weight: bool = True) -> torch.Tensor:
        """‖W0 + s·B·A‖_row from the factors (no gradient), never building an out×in tensor."""
        down, up, s = self.lora_A, self.lora_B, self.scale
        cross = (base_times(weight, down.t()) * up).sum(1)  # rows of ⟨W0, BA⟩
        own = ((up @ (down @ down.t())) * up).sum(1)        # rows of ‖BA‖²
        squared = self._base_norms_squared(weight, layer_weight) + (2 * s) * cross + (s * s) * own
        return squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt()

    def gain(self, norms: torch.Tensor) -> torch.Tensor:
        return self.magnitude / norms

    def _delta(self, weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        g = self.gain(norms)[:, None]
        base = weight.reshape(weight.shape[0], -1).to(g.dtype)
        return ((g - 1) * base + g * self.low_rank()).view(self.slot_shape)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """(g − 1) ⊙ W0 + g ⊙ s·B·A for the layer's weight W0."""
        return self._delta(weight, self.row_norms(weight))

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # ``weight`` may carry other adapters' weight-path deltas: DoRA normalises the weight it sits on
        return weight + self._delta(weight, self.row_norms(weight, layer_weight=False)).to(weight.dtype)

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        self.merged_norms = self.row_norms(weight)
        return weight.float() + scale * self._delta(weight, self.merged_norms).float()

    @torch.no_grad()
    def unmerged_weight(self, merged: torch.Tensor, scale: float) -> torch.Tensor:
        """W0 from W0 + scale·((g − 1) ⊙ W0 + g ⊙ s·B·A), with g as it was at merge time."""
        g = self.gain(self.merged_norms).float()[:, None]
        rows = merged.reshape(merged.shape[0], -1).float() - scale * g * self.low_rank().float()
        self.merged_norms = None
        return (rows / (1 + scale * (g - 1))).view(self.slot_shape)

    def add_output_delta(self, x: torch.Tensor, out: torch.Tensor, slot: Slot, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
        gain = self.gain(self.row_norms(weight))
        return apply_gain(self.add_branch(x, out, slot, self.scale), gain, bias, self.channel_dim(slot))

    @torch.no_grad()
    def set_magnitude(self, values: torch.Tensor) -> None:
        """Set m from any tensor of one value per output channel (PEFT's (out,) or a conv's (1, out, 1, 1))."""
        if values.numel() != self.magnitude.numel() or not bool(torch.isfinite(values).all()):
            raise ValueError(f"magnitude of shape {tuple(values.shape)} does not fit this layer's "
                             f"{self.magnitude.numel()} output channels, or is not finite")
        self.magnitude.copy_(values.reshape(self.magnitude.shape))
