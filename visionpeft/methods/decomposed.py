"""What DoRA and MAP share: a LoRA update ΔV = s·B·A whose sum with the frozen weight is renormalised, so the
method's ΔW is a function of W0 as well (``Method.reads_base``).

Both run on activations as ``y = gain ⊙ (W0·x + branch_scale · B(A·dropout(x))) + b``: LoRA's fused branch
(:func:`~visionpeft.methods.lowrank.add_low_rank_output`) followed by :func:`apply_gain`, a per-output-channel
(DoRA) or scalar (MAP) gain that leaves the bias as it was. The gain is applied in place on the branch's result
and backward keeps only that result (a copy-on-write alias of the layer's output, which the next layer usually
keeps anyway), so the activation path keeps no output-sized tensor of its own and no weight-sized one.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from visionpeft.layers.kinds import Slot
from visionpeft.methods.base import Method, Option, boolean, positive_int, probability
from visionpeft.methods.lora import LoRA
from visionpeft.methods.lowrank import _sum_target, add_low_rank_output

#: elements of the base weight cast to the adapter's dtype at a time (a half-precision base is never copied whole)
_CHUNK = 1 << 20


def _finite_positive_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and math.isfinite(value) and value > 0)


LOW_RANK_OPTIONS = {
    "rank": Option(8, positive_int, "an int >= 1", "rank of the update"),
    "alpha": Option(None, _finite_positive_or_none, "a finite number > 0, or None for alpha = rank", "scale numerator"),
    "dropout": Option(0.0, probability, "a float in [0, 1)", "dropout on the low-rank branch's input"),
    "rslora": Option(False, boolean, "True or False", "scale by alpha/sqrt(rank) instead of alpha/rank"),
}


def _rows(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


def base_times(weight: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``W0 (out, fan_in) @ matrix (fan_in, k)`` in ``matrix``'s dtype; a half-precision W0 is cast a block of
    rows at a time, so no float32 copy of the weight is made."""
    rows = _rows(weight)
    if rows.dtype == matrix.dtype:
        return rows @ matrix
    step = max(1, _CHUNK // max(1, rows.shape[1]))
    return torch.cat([block.to(matrix.dtype) @ matrix for block in rows.split(step)])


def row_norms_squared(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """‖W0ᵢ‖² per output row (every dim but the first) in ``dtype``, a block of rows at a time."""
    rows = _rows(weight.detach())
    step = max(1, _CHUNK // max(1, rows.shape[1]))
    return torch.cat([block.to(dtype).pow(2).sum(1) for block in rows.split(step)])


class NormalizedLowRank(LoRA):
    """LoRA's factors, options, dropout and choice of path, on a method whose ΔW also reads the base weight."""

    reads_base = True
    options = LOW_RANK_OPTIONS

    def fit_delta(self, delta: torch.Tensor) -> None:
        return Method.fit_delta(self, delta)

    def channel_dim(self, slot: Slot) -> int:
        return 1 if slot.op == "conv" else -1

    def add_branch(self, x: torch.Tensor, out: torch.Tensor, slot: Slot, scale: float | torch.Tensor) -> torch.Tensor:
        """``out + scale · B(A·dropout(x))``; ``scale`` a number or a 0-dim tensor that trains."""
        if self.dropout is not None:
            x = self.dropout(x)
        if slot.op == "conv" and slot.groups != 1:  # grouped: exact only through the (small) kernel of ΔV itself
            kernel = (scale * (self.lora_B @ self.lora_A)).view(self.slot_shape)
            return out + slot.run(x, kernel.to(x.dtype)).to(out.dtype)
        mid = scale.expand(self.rank) if isinstance(scale, torch.Tensor) else scale
        return add_low_rank_output(x, out, slot, self.lora_A, self.lora_B, mid)

    def low_rank(self) -> torch.Tensor:
        """s·B·A as a (out, fan_in) matrix in the adapter's dtype (dense: the weight path and merges only)."""
        return (self.lora_B @ self.lora_A).mul_(self.scale)


def apply_gain(u: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``gain ⊙ u + (1 − gain) ⊙ bias``, with ``gain`` a (channels,) vector along ``dim`` or a 0-dim tensor: a layer
    output ``u = V·x + b`` becomes ``gain ⊙ V·x + b``. Exactly ``u`` where the gain is 1."""
    if torch.is_autocast_enabled(u.device.type) or torch.compiler.is_compiling():  # stock ops, as lowrank does
        shaped = _along(gain.to(u.dtype), u.dim(), dim)
        result = u * shaped
        return result if bias is None else result + (1 - shaped) * _along(bias.to(u.dtype), u.dim(), dim)
    target, in_place = _sum_target(u)
    dim = dim if dim >= 0 else target.dim() + dim  # u may be a view of target: channels stay first or last
    if torch.is_grad_enabled() and (u.requires_grad or gain.requires_grad):
        return _Gain.apply(target, gain, bias, dim, in_place).view(u.shape)
    return _gained(target, gain, bias, dim, in_place).view(u.shape)  # nothing to keep for backward


def _gained(u: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor | None, dim: int, in_place: bool) -> torch.Tensor:
    g = _along(gain.to(u.dtype), u.dim(), dim)
    if bias is None:
        return u.mul_(g) if in_place else u * g
    offset = (1 - g) * _along(bias.to(u.dtype), u.dim(), dim)
    return torch.addcmul(offset, u, g, out=u) if in_place else torch.addcmul(offset, u, g)  # one pass


def _along(vector: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    if vector.dim() == 0:
        return vector
    shape = [1] * ndim
    shape[dim] = -1
    return vector.view(shape)


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    """What backward keeps of the output: a copy-on-write alias, so a later in-place op on the output (a ReLU with
    inplace=True) copies it then instead of invalidating what backward needs; no copy is made otherwise."""
    lazy_clone = getattr(torch, "_lazy_clone", None)
    return lazy_clone(tensor) if lazy_clone is not None else tensor


def _product_sums(a: torch.Tensor, b: torch.Tensor, others: list[int], dtype: torch.dtype) -> torch.Tensor:
    """``(a ⊙ b).sum(others)`` a block of the first dim at a time: the product never takes an output-sized
    temporary (on CPU a fresh output-sized result costs page faults and a pass through memory of its own)."""
    if 0 not in others or a.shape[0] == 1:
        return (a * b).sum(others, dtype=dtype)
    step = max(1, _CHUNK // max(1, a[0].numel()))
    total = None
    for a_block, b_block in zip(a.split(step), b.split(step)):
        part = (a_block * b_block).sum(others, dtype=dtype)
        total = part if total is None else total.add_(part)
    return total


class _Gain(torch.autograd.Function):
    """``y = g ⊙ u + (1 − g) ⊙ b``. Backward recovers u − b = (y − b)/g from the kept output: where g is exactly 0
    (a zero row of W0, whose magnitude starts at 0 and, with its B row getting no gradient, never moves) that
    term is 0. The recovered u carries the output's rounding scaled by |b|/|g|, negligible unless g is tiny."""

    @staticmethod
    def forward(ctx, u, gain, bias, dim, in_place):
        y = _gained(u, gain, bias, dim, in_place)
        if in_place:
            ctx.mark_dirty(u)
        ctx.save_for_backward(_keep(y), gain, bias)
        ctx.dim = dim
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, gain, bias = ctx.saved_tensors
        need_u, need_gain, need_bias = ctx.needs_input_grad[:3]
        dim = ctx.dim
        g = _along(gain.to(grad.dtype), grad.dim(), dim)
        grad_u = grad * g if need_u else None
        others = [d for d in range(grad.dim()) if d != dim]
        acc = torch.promote_types(grad.dtype, torch.float32)  # sums over the batch at least in float32
        grad_gain = grad_bias = None
        if need_bias or (need_gain and bias is not None):  # a bias-free layer (a conv before a norm) skips this pass
            grad_sum = grad.sum(others, dtype=acc)
        if need_gain:
            weighted = _product_sums(grad, y, others, acc)  # Σ G ⊙ y per channel
            if bias is not None:
                weighted = weighted - bias.to(acc) * grad_sum
            if gain.dim() == 0:
                weighted = weighted.sum()
            grad_gain = torch.where(gain != 0, weighted / gain.to(acc), 0.0).to(gain.dtype)
        if need_bias:
            grad_bias = ((1 - gain.to(acc)) * grad_sum).to(bias.dtype)
        return grad_u, grad_gain, grad_bias, None, None
