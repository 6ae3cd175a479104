"""SaRA's sparse backprop: autograd functions that give a sparse set of weight entries their gradient
without any weight-sized gradient kept (``sara.py``'s module docstring says which path runs where).

* :class:`ScatterAdd`: a copy of W with the value changes index-added; backward gathers ``dW[indices]``.
* :class:`SampledGradientTap`: on the op's output; backward computes only the selected entries of gᵀx.
* :class:`SparseLinearDelta`: ``x · ΔWᵀ`` with ΔW as CSR; backward by ``torch.sparse.sampled_addmm``.
"""
from __future__ import annotations

import warnings

import torch

from visionpeft.layers.kinds import Slot
from visionpeft.layers.sampled import sampled_conv2d_weight_gradient, sampled_weight_gradient


def _storage_positions(index: torch.Tensor, shape: tuple[int, ...], strides: tuple[int, ...]) -> torch.Tensor:
    """Storage offsets of the row-major flat positions ``index`` in a dense tensor with ``strides``."""
    positions = torch.zeros_like(index)
    remaining = index
    for size, stride in zip(reversed(shape), reversed(strides)):
        positions = positions + (remaining % size) * stride
        remaining = torch.div(remaining, size, rounding_mode="floor")
    return positions


def scatter_add_copy(weight: torch.Tensor, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` with ``source`` added at the row-major flat positions ``index``. The copy keeps
    the weight's memory layout (a transposed Conv1D weight stays transposed), so the op runs the same
    kernel as on the base weight."""
    out = weight.clone()
    if out.is_contiguous():
        out.view(-1).index_add_(0, index, source)
    else:  # dense but permuted: address the storage directly
        flat = out.as_strided((out.numel(),), (1,))
        flat.index_add_(0, _storage_positions(index, tuple(out.shape), out.stride()), source)
    return out


class ScatterAdd(torch.autograd.Function):
    """:func:`scatter_add_copy` whose backward returns only the gathered gradient ``grad[index]``."""

    @staticmethod
    def forward(ctx, weight, source, index):
        ctx.save_for_backward(index)
        return scatter_add_copy(weight, source, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        grad_weight = grad if ctx.needs_input_grad[0] else None
        grad_source = grad.reshape(-1).index_select(0, index) if ctx.needs_input_grad[1] else None
        return grad_weight, grad_source, None


class SampledGradientTap(torch.autograd.Function):
    """The op's output unchanged; backward gives ``values`` the selected entries of gᵀx (and g passes on).

    ``indices``: the selected flat positions in the (out, fan_in) weight of the output rows ``rows`` of
    ``slot``; ``frozen``: None, or a mask of the entries that get no gradient. Both are read at backward time.
    """

    @staticmethod
    def forward(ctx, out, x, values, indices, frozen, slot: Slot, rows: slice):
        ctx.save_for_backward(x)
        ctx.indices, ctx.frozen, ctx.slot, ctx.rows, ctx.dtype = indices, frozen, slot, rows, values.dtype
        ctx.mark_dirty(out)  # returned as itself, not as a view, so later in-place ops on it stay legal
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        slot = ctx.slot
        rows, cols = ctx.indices // slot.in_features, ctx.indices % slot.in_features
        if slot.op == "linear":
            grad_values = sampled_weight_gradient(grad[..., ctx.rows], x, rows, cols, ctx.dtype)
        else:  # an ungrouped 2-D convolution (SaRA.gradient_from_output); output channels are dim -3
            grad_values = sampled_conv2d_weight_gradient(grad[..., ctx.rows, :, :], x, rows, cols, ctx.dtype,
                                                         slot.kernel_size, slot.stride, slot.dilation,
                                                         slot.reversed_padding)
        if ctx.frozen is not None:
            grad_values.masked_fill_(ctx.frozen, 0)
        return grad, None, grad_values, None, None, None, None


def csr_structure(indices: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR row pointers and column indices of the sorted flat positions ``indices`` in an (out, in) matrix."""
    out, fan_in = shape
    rows = torch.div(indices, fan_in, rounding_mode="floor")
    crow = torch.zeros(out + 1, dtype=indices.dtype, device=indices.device)
    crow[1:] = torch.bincount(rows, minlength=out).cumsum(0)
    return crow, indices % fan_in


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class SparseLinearDelta(torch.autograd.Function):
    """``x · ΔWᵀ`` for x (tokens, in) and ΔW (out, in) given as CSR; backward computes only ΔW's entries."""

    @staticmethod
    def forward(ctx, x, delta_values, crow, col, shape):
        ctx.save_for_backward(x, delta_values, crow, col)
        ctx.shape = shape
        return (_csr(crow, col, delta_values, shape) @ x.t()).t()

    @staticmethod
    def backward(ctx, grad):
        x, delta_values, crow, col = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = (_csr(crow, col, delta_values, ctx.shape).t() @ grad.t()).t()
        if ctx.needs_input_grad[1]:
            pattern = _csr(crow, col, torch.zeros_like(delta_values), ctx.shape)
            grad_values = torch.sparse.sampled_addmm(pattern, grad.t().contiguous(), x, beta=0.0).values()
        return grad_x, grad_values, None, None, None
