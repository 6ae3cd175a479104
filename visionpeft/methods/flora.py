"""FLoRA (Si et al., 2024): a Tucker low-rank update that keeps a weight's N-dimensional structure.

    ΔW = s · G ×₁ U_out ×₂ U_in ×₃ U_k1 … ×_N U_kN

with a core ``G`` of shape ``(r_out, r_in, r_k1, …)`` and one factor ``U_n`` of shape ``(d_n, r_n)`` per
mode, all in PyTorch weight order ``(out, in/groups, *kernel)`` (the reference code lists modes as
(in, out, …) and transposes at the end; its rank lists must be reordered accordingly). Linear weights
have 2 modes, Conv1d/2d/3d kernels 3-5. The core starts at zero and the factors Kaiming-normal
(a=√3, as in the reference), so attaching changes nothing.

Forward, measured (``benchmarks/flora.py``): on linear ops and ungrouped convs the update runs as a
branch x → U_inᵀ (1×1) → the core conv (kernel modes expanded, base geometry) → U_out (1×1), added into the
base output in one fused op that also applies the scale (its alpha): it never builds ΔW, needs no
weight-sized gradient, and costs a small fraction of the base conv. The branch is one autograd function
(``lowrank.add_low_rank_output``): the 1×1 maps are batched matrix products, and on linear ops and 1×1
convs U_in is folded into the core first. One conv with U_in folded into the
kernel (PEFT's shape) has one op fewer but C_in·r·k² multiply-adds: on the 35M UNet it stepped at 1.40× the
floor against 1.46× in the same run, and per layer at SD-1.5's widths its extra cost is 2-5× the branch's.
Grouped and depthwise convs (where in/groups is the input mode) and MultiheadAttention use W + ΔW, with ΔW
from one ordered contraction.
"""
from __future__ import annotations

import math
import string
from typing import Any, Sequence

import torch
from torch import nn

from visionpeft.layers.kinds import Slot
from visionpeft.methods.base import (
    Method, Option, adapter_dtype, positive_int, positive_number_or_none, probability, register,
)
from visionpeft.methods.lowrank import add_low_rank_output

DEFAULT_SCALE = 4.0


def _rank_spec(value: Any) -> bool:
    if positive_int(value):
        return True
    return isinstance(value, (tuple, list)) and 2 <= len(value) <= 5 and all(positive_int(v) for v in value)


def _path(value: Any) -> bool:
    return value in ("auto", "branch", "weight")


def mode_ranks(shape: Sequence[int], rank: int | Sequence[int], spatial_rank: int) -> tuple[int, ...]:
    """Per-mode Tucker ranks for a weight of ``shape`` (out, in/groups, *kernel), each capped at its mode's size."""
    if isinstance(rank, int):
        wanted = [rank, rank] + [min(k, spatial_rank) for k in shape[2:]]
    else:
        if len(rank) != len(shape):
            raise ValueError(f"rank={tuple(rank)} has {len(rank)} modes but the weight {tuple(shape)} has {len(shape)} "
                             f"(give one rank per mode in PyTorch order (out, in, *kernel), or an int)")
        wanted = list(rank)
    return tuple(min(r, d) for r, d in zip(wanted, shape))


def tucker_to_tensor(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """G ×₁ U₁ … ×_N U_N, one mode product at a time: kernel modes first, then in, then out, so only
    the last product is weight-sized (measured 2-2.5× faster than tensorly's multi_mode_dot and 3-4×
    faster than one torch.einsum, forward + backward; ``benchmarks/flora.py --contraction``)."""
    result = core
    for mode in [*range(2, core.dim()), 1, 0]:
        result = torch.tensordot(factors[mode], result, dims=([1], [mode])).movedim(0, mode)
    return result


def tucker_to_tensor_einsum(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The same product as a single einsum (kept for the benchmark's comparison)."""
    letters = string.ascii_letters
    n = core.dim()
    core_idx, out_idx = letters[:n], letters[n:2 * n]
    spec = ",".join([core_idx] + [out_idx[i] + core_idx[i] for i in range(n)]) + "->" + out_idx
    return torch.einsum(spec, core, *factors)


@register
class FLoRA(Method):
    name = "flora"
    options = {
        "rank": Option(4, _rank_spec, "an int >= 1, or one int >= 1 per mode in PyTorch order (out, in, *kernel)",
                       "Tucker rank of the channel modes (or of every mode)"),
        "spatial_rank": Option(2, positive_int, "an int >= 1", "rank of each kernel mode (capped at its size)"),
        "scale": Option(None, positive_number_or_none, "a number > 0, or None",
                        f"raw multiplier s of the update (default {DEFAULT_SCALE}, as the reference)"),
        "alpha": Option(None, positive_number_or_none, "a number > 0, or None",
                        "LoRA-style scale numerator: s = alpha / rank (not together with scale)"),
        "dropout": Option(0.0, probability, "a float in [0, 1)", "dropout on the adapter's input"),
        "path": Option("auto", _path, "'auto', 'branch' or 'weight'",
                       "forward: 'branch' runs factor convs on activations, 'weight' runs the op with W + ΔW"),
    }

    def __init__(self, slot: Slot, rank, spatial_rank: int, scale: float | None, alpha: float | None,
                 dropout: float, path: str) -> None:
        if scale is not None and alpha is not None:
            raise ValueError(f"give scale={scale} or alpha={alpha}, not both")
        super().__init__(slot, rank=rank, spatial_rank=spatial_rank, scale=scale, alpha=alpha, dropout=dropout, path=path)
        self.ranks = mode_ranks(slot.shape, rank, spatial_rank)
        if alpha is not None:
            self.scale = alpha / (rank if isinstance(rank, int) else rank[0])
        else:
            self.scale = DEFAULT_SCALE if scale is None else scale
        dtype = adapter_dtype(slot.dtype)
        self.core = nn.Parameter(torch.zeros(self.ranks, dtype=dtype, device=slot.device))
        self.factors = nn.ParameterList()
        for size, r in zip(slot.shape, self.ranks):
            factor = torch.empty(size, r, dtype=dtype, device=slot.device)
            nn.init.kaiming_normal_(factor, a=math.sqrt(3), mode="fan_in")
            self.factors.append(nn.Parameter(factor))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.path = path

    def delta(self) -> torch.Tensor:
        return tucker_to_tensor(self.core * self.scale, list(self.factors))

    @torch.no_grad()
    def fit_delta(self, delta: torch.Tensor) -> None:
        """Truncated Tucker decomposition (HOOI from an HOSVD start, tensorly) at this adapter's ranks."""
        import tensorly
        from tensorly.decomposition import tucker

        with tensorly.backend_context("pytorch"):
            core, factors = tucker(delta.double(), rank=list(self.ranks), init="svd", n_iter_max=50, tol=1e-10)
        self.core.copy_(core / self.scale)
        for target, factor in zip(self.factors, factors):
            target.copy_(factor)

    def uses_activation_path(self, slot: Slot) -> bool:
        if slot.op not in ("linear", "conv"):
            return False
        if self.path == "weight":
            return self.dropout is not None
        return self.path == "branch" or slot.op == "linear" or slot.groups == 1 or self.dropout is not None

    def spatial_core(self) -> torch.Tensor:
        """The unscaled core with its kernel modes expanded, (r_out, r_in, *kernel): one product with the
        Kronecker product of the kernel factors (fewer small ops than one mode product per kernel mode)."""
        if self.core.dim() == 2:
            return self.core
        kernel = self.factors[2]
        for factor in self.factors[3:]:
            kernel = torch.kron(kernel, factor)
        r_out, r_in = self.ranks[:2]
        return (self.core.reshape(r_out * r_in, -1) @ kernel.t()).view(r_out, r_in, *self.slot_shape[2:])

    def add_output_delta(self, x: torch.Tensor, out: torch.Tensor, slot: Slot) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        if slot.op == "conv" and slot.groups != 1:  # exact only through ΔW with the base's groups
            return out.add_(slot.run(x, self.delta().to(x.dtype)).to(out.dtype))
        # linear or 1×1: add_low_rank_output folds U_in into the core; otherwise it runs as a 1×1 map first
        return add_low_rank_output(x, out, slot, self.spatial_core(), self.factors[0], self.scale, pre=self.factors[1])
