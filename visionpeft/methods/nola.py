"""NOLA (Koohpayegani et al., ICLR 2024): LoRA's factors as linear combinations of frozen random bases.

A = A0 + Σᵢ αᵢ Aᵢ (i = 1..k) and B = Σⱼ βⱼ Bⱼ (j = 1..l), ΔW = s·B·A with s = alpha/rank. Only the k + l
coefficients train, whatever the layer's size. This is the reference's language-model convention
(``gpt/src/model_nola.py``): bases uniform in [−1, 1), A0 a frozen Kaiming-uniform matrix like LoRA's A, every
coefficient zero at attach, so ΔW = 0 (attaching changes nothing) and B's coefficients get the first gradient.
(Its ViT path starts at αᵢ = 1/k, βⱼ = 1/l, a non-zero ΔW.)

Bases and A0 come from a per-layer seed, a SHA-256 hash of the adapter's ``seed`` and the layer's qualified name
(``NOLA.prepare``), drawn by a local CPU ``torch.Generator`` (the global RNG is never touched), so they are the
same in every process and on every device; on an accelerator they are drawn on the CPU and moved. They are never
stored: the checkpoint holds the coefficients and an empty ``layer_shape`` stamp (zero elements, shaped like the
layer's weight, so that loading onto a layer of another shape fails the shape check), and ``adapter.json`` the seed.
Nor are they kept for backward: :class:`_Combination` draws them a block at a time in forward to form A and B
(LoRA-sized) and draws them again in backward, where the coefficients' gradient is ⟨∇A, Aᵢ⟩ (and ⟨∇B, Bⱼ⟩).
The bases' peak memory is one block (``_BLOCK`` elements), not k·rank·fan_in + l·out·rank.

A and B then run as LoRA's factors: on activations for linear ops and ungrouped convs (the fused low-rank
branch), through ΔW for grouped convs, MultiheadAttention and modules with their own forward.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from visionpeft.layers.kinds import Slot
from visionpeft.methods.base import (
    Method, Option, adapter_dtype, positive_int, positive_number_or_none, register,
)
from visionpeft.methods.lowrank import add_low_rank_output

#: basis elements drawn at a time (a block of whole bases; 16 MiB in float32)
_BLOCK = 1 << 22


def _two_positive_ints(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(positive_int(v) for v in value)


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from a SHA-256 hash of ``parts`` (stable across processes, unlike ``hash()``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RandomBases:
    """``count`` frozen bases of ``shape`` drawn uniform in [−1, 1), in blocks of whole bases, each block from its
    own seed derived from ``seed``: any block can be redrawn alone, identically."""

    def __init__(self, seed: int, count: int, shape: tuple[int, ...]) -> None:
        self.seed, self.count, self.shape = seed, count, tuple(shape)
        self.numel = 1
        for size in shape:
            self.numel *= size
        self.per_block = max(1, _BLOCK // self.numel)

    def blocks(self, device: torch.device, dtype: torch.dtype):
        """(first index, (n, numel) block of bases) for every block, in order."""
        for index, start in enumerate(range(0, self.count, self.per_block)):
            n = min(self.per_block, self.count - start)
            generator = torch.Generator().manual_seed(derived_seed(self.seed, index))
            block = torch.rand(n, self.numel, generator=generator).mul_(2).sub_(1)
            yield start, block.to(device=device, dtype=dtype)


class _Combination(torch.autograd.Function):
    """``Σᵢ cᵢ basisᵢ``, drawing the bases in forward and again in backward instead of keeping them."""

    @staticmethod
    def forward(ctx, coefficients: torch.Tensor, bases: RandomBases) -> torch.Tensor:
        total = torch.zeros(bases.numel, dtype=coefficients.dtype, device=coefficients.device)
        for start, block in bases.blocks(coefficients.device, coefficients.dtype):
            total.addmv_(block.t(), coefficients[start:start + block.shape[0]])
        ctx.bases = bases
        return total.view(bases.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        flat = grad.reshape(-1)
        parts = [block @ flat.to(block.dtype) for _, block in ctx.bases.blocks(grad.device, grad.dtype)]
        return torch.cat(parts), None


@register
class NOLA(Method):
    name = "nola"
    options = {
        "rank": Option(8, positive_int, "an int >= 1", "rank of A and B"),
        "num_basis": Option((1024, 1024), _two_positive_ints, "two ints >= 1, (k, l)",
                            "number of random bases of A (k) and of B (l): the trainable values per layer"),
        "seed": Option(0, _non_negative_int, "an int >= 0", "seed of the bases (with each layer's name)"),
        "alpha": Option(None, positive_number_or_none, "a number > 0, or None for alpha = rank", "scale numerator"),
    }

    def __init__(self, slot: Slot, rank: int, num_basis, seed: int, alpha: float | None,
                 layer_seed: int | None = None) -> None:
        super().__init__(slot, rank=rank, num_basis=tuple(num_basis), seed=seed, alpha=alpha)
        if layer_seed is None:
            raise ValueError("nola needs a per-layer seed (computed by NOLA.prepare from seed and the layer's name)")
        k, l = num_basis
        self.rank, self.scale = rank, (rank if alpha is None else alpha) / rank
        dtype = adapter_dtype(slot.dtype)
        fan_in, out = slot.in_features, slot.out_features
        self.bases_A = RandomBases(derived_seed(layer_seed, "A"), k, (rank, fan_in))
        self.bases_B = RandomBases(derived_seed(layer_seed, "B"), l, (out, rank))
        initial = nn.init.kaiming_uniform_(torch.empty(rank, fan_in), a=math.sqrt(5),  # LoRA's A init
                                           generator=torch.Generator().manual_seed(layer_seed))
        self.register_buffer("initial_A", initial.to(slot.device, dtype), persistent=False)  # A0, redrawn on load
        self.register_buffer("layer_shape", torch.empty(0, *slot.shape, device=slot.device))
        self.nola_alpha = nn.Parameter(torch.zeros(k, dtype=dtype, device=slot.device))
        self.nola_beta = nn.Parameter(torch.zeros(l, dtype=dtype, device=slot.device))

    @classmethod
    def prepare(cls, slots, options):
        return [dict(options, layer_seed=derived_seed(options["seed"], label)) for label, _, _ in slots]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (rank × fan_in), B (out × rank)) as combinations of the bases, differentiable in the coefficients."""
        down = self.initial_A + _Combination.apply(self.nola_alpha, self.bases_A)
        return down, _Combination.apply(self.nola_beta, self.bases_B)

    def delta(self) -> torch.Tensor:
        down, up = self.factors()
        return (up @ down).mul_(self.scale).view(self.slot_shape)

    def uses_activation_path(self, slot: Slot) -> bool:
        return slot.op == "linear" or (slot.op == "conv" and slot.groups == 1)

    def add_output_delta(self, x: torch.Tensor, out: torch.Tensor, slot: Slot) -> torch.Tensor:
        down, up = self.factors()
        return add_low_rank_output(x, out, slot, down, up, self.scale)
