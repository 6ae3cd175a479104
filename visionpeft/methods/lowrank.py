"""The shared activation path of low-rank updates ΔW = up · diag(mid) · down [· pre] on linear ops and convs.

The branch ``out + alpha · up · (mid ⊙ down(pre(x)))`` runs as one autograd function per op kind (linear,
conv) with a hand-written backward. Built from stock ops, the same branch is 10-20 small aten calls and 8-12
autograd nodes per layer (views, casts, transposes, a contiguous copy of ``up``): on a UNet of 278 small
adapted layers that host work, not the arithmetic, is most of the adapter's step time (``benchmarks/README.md``, FLoRA section).
The composed form stays for what the functions do not cover (autocast, torch.compile, padding modes other than
zeros, asymmetric "same" padding) and as the reference the tests hold the functions to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from visionpeft.layers.kinds import Slot
from visionpeft.methods.saved_input import keep_input, kept_value


def add_low_rank_output(x: torch.Tensor, out: torch.Tensor, slot: Slot, down: torch.Tensor, up: torch.Tensor,
                        mid: float | torch.Tensor = 1.0, pre: torch.Tensor | None = None) -> torch.Tensor:
    """``out + up · (mid ⊙ down(pre(x)))``, where

    - ``pre`` (optional, FLoRA's U_in) is a (channels of x, r_pre) matrix applied per position (a 1×1 map);
    - ``down`` is (rank, fan_in) or (rank, channels, *kernel), run with the slot's own geometry (a conv of the base's
      kernel, stride, padding and dilation into ``rank`` channels; convs need groups == 1);
    - ``up`` is (out, rank), a 1×1 map; ``mid`` a scalar (riding on the fused product's alpha) or a (rank,) vector.

    The up-projection and the sum are one ``addmm``/``baddbmm`` on the base output, in place where nothing keeps
    that output (:func:`_sum_target`). Backward keeps the rank-sized activations and the factors, never a
    weight-sized tensor, and x for the gradient of ``down``: on a linear op only where ``down`` or ``pre`` trains, and
    as the input of the activation x came from where that activation's node keeps it
    (:mod:`~visionpeft.methods.saved_input`; a frozen linear keeps no copy of x, a conv keeps x itself). Gradients
    are first-order only.
    """
    if x.dtype != out.dtype or torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling():
        # under torch.compile the traced graph has no per-op host cost to save, and the functions' in-place sum
        # and hand-written backward do not survive tracing (the factors got no gradient)
        return _composed(x, out, slot, down, up, mid, pre)
    alpha = 1.0 if isinstance(mid, torch.Tensor) else float(mid)
    mid_vector = mid if isinstance(mid, torch.Tensor) else None
    padding = _numeric_padding(slot) if slot.op == "conv" else None
    if slot.op == "conv" and padding is None:
        return _composed(x, out, slot, down, up, mid, pre)
    target, in_place = _sum_target(out)
    if slot.op == "linear":
        result = _LinearBranch.apply(x, target, pre, down, up, mid_vector, alpha, in_place)
    else:
        result = _ConvBranch.apply(x, target, pre, down, up, mid_vector, alpha, in_place,
                                   (list(slot.stride), padding, list(slot.dilation)), slot.kernel_size)
    return result.view(out.shape)


#: the grad_fn of base outputs that no backward keeps: the stock linear and conv ops save their inputs only
_UNKEPT_OUTPUTS = frozenset({"AddmmBackward0", "MmBackward0", "UnsafeViewBackward0", "ConvolutionBackward0",
                             "_LinearBranchBackward", "_ConvBranchBackward"})


def _sum_target(out: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The tensor to add the branch into, and whether in place: the base output itself when no backward keeps it
    (else autograd would fail, or would copy the output gradient for a view), or the (rows, features) result a
    linear op's output on 3-D input is a view of. On CPU a fresh output-sized result costs more than the sum
    (page faults on newly mapped memory, one more pass): a rank-8 ``addmm`` into a 25,088 × 384 output took
    17 ms as a fresh result, 9 ms into a reused buffer and 5 ms in place (``python benchmarks/flora.py --in-place``)."""
    target = out
    if out._is_view():
        base = out._base
        # a view of a tensor that autograd does not track (another function's output made inside it) is no target
        if base.numel() != out.numel() or not (base.is_contiguous() and out.is_contiguous()) \
                or base.requires_grad != out.requires_grad:
            return out, False
        target = base
    node = target.grad_fn
    unkept = type(node).__name__ in _UNKEPT_OUTPUTS if node is not None else not target.requires_grad
    return (target, True) if unkept and target.is_contiguous() else (out, False)


def _numeric_padding(slot: Slot) -> list[int] | None:
    """The conv's zero padding per side as numbers, or None where only the composed form is exact."""
    if slot.padding_mode != "zeros":
        return None
    if slot.padding == "valid":
        return [0] * len(slot.stride)
    if slot.padding == "same":
        totals = [d * (k - 1) for d, k in zip(slot.dilation, slot.kernel_size)]
        return None if any(t % 2 for t in totals) else [t // 2 for t in totals]
    return list(slot.padding)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """(..., features) as a matrix of rows."""
    return tensor if tensor.dim() == 2 else tensor.reshape(-1, tensor.shape[-1])


def _scaled(tensor: torch.Tensor, alpha: float) -> torch.Tensor:
    """``tensor`` (a fresh result, scaled in place) times alpha."""
    return tensor if alpha == 1.0 else tensor.mul_(alpha)


def _shaped(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return tensor if tensor.shape == shape else tensor.reshape(shape)


def _grad_like(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    if grad is None:
        return None
    return _shaped(_cast(grad, like.dtype), like.shape)


def _folded_grads(grad_down_w, down, pre, need_down, need_pre):
    """Gradients of ``down`` and ``pre`` from that of ``down_w = down · preᵀ`` (rows of down flattened)."""
    down_rows = _cast(down, grad_down_w.dtype).reshape(down.shape[0], -1)
    grad_down = torch.mm(grad_down_w, _cast(pre, grad_down_w.dtype)) if need_down else None
    grad_pre = torch.mm(grad_down_w.t(), down_rows) if need_pre else None
    return grad_down, grad_pre


class _LinearBranch(torch.autograd.Function):
    """``out + alpha · (mid ⊙ x · (down · preᵀ)ᵀ) · upᵀ``: ``pre`` (fan_in, r_pre) is folded into ``down``
    (r·r_pre·fan_in multiply-adds, no extra activation). Factors are cast to x's dtype, gradients back."""

    @staticmethod
    def forward(ctx, x, out, pre, down, up, mid, alpha, in_place):
        dtype = x.dtype
        down_w = _cast(down, dtype).reshape(down.shape[0], -1)
        if pre is not None:
            down_w = torch.mm(down_w, _cast(pre, dtype).t())
        h = _rows(x) @ down_w.t()
        hm = h if mid is None else h * _cast(mid, dtype)
        if in_place:
            _rows(out).addmm_(hm, _cast(up, dtype).t(), alpha=alpha)
            ctx.mark_dirty(out)
            result = out
        else:
            result = torch.addmm(_rows(out), hm, _cast(up, dtype).t(), alpha=alpha)  # viewed outside, tracked
        # x only serves the gradient of down (and pre): saved where one trains, as what rebuilds it (saved_input)
        saved_x, ctx.rebuild_x = keep_input(x) if ctx.needs_input_grad[3] or ctx.needs_input_grad[2] else (None, None)
        ctx.save_for_backward(saved_x, h, pre, down, up, mid, down_w)
        ctx.alpha, ctx.out_shape, ctx.x_shape = alpha, out.shape, x.shape
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        saved_x, h, pre, down, up, mid, down_w = ctx.saved_tensors
        need_x, need_out, need_pre, need_down, need_up, need_mid = ctx.needs_input_grad[:6]
        alpha, dtype = ctx.alpha, h.dtype
        g = _rows(grad)
        hm = h if mid is None else h * _cast(mid, dtype)
        # as hmᵀ·g: oneDNN runs the transposed product (gᵀ·hm)ᵀ up to 10x slower for a tall hm
        grad_up = _scaled(torch.mm(hm.t(), g).t(), alpha) if need_up else None
        grad_hm = _scaled(torch.mm(g, _cast(up, dtype)), alpha)
        grad_mid = (grad_hm * h).sum(0) if need_mid else None
        grad_h = grad_hm if mid is None else grad_hm * _cast(mid, dtype)
        grad_x = torch.mm(grad_h, down_w).view(ctx.x_shape) if need_x else None
        grad_down = grad_pre = None
        if need_down or need_pre:
            grad_down_w = torch.mm(grad_h.t(), _rows(kept_value(saved_x, ctx.rebuild_x)))
            if pre is None:
                grad_down = grad_down_w
            else:
                grad_down, grad_pre = _folded_grads(grad_down_w, down, pre, need_down, need_pre)
        return (grad_x, _shaped(grad, ctx.out_shape) if need_out else None, _grad_like(grad_pre, pre),
                _grad_like(grad_down, down), _grad_like(grad_up, up), _grad_like(grad_mid, mid), None, None)


def _conv(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    return torch.ops.aten.convolution(x, weight, None, stride, padding, dilation, False, [0] * len(stride), 1)


def _conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                   need_input: bool, need_weight: bool):
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, stride, padding, dilation, False, [0] * len(stride), 1, [need_input, need_weight, False])
    return grad_input, grad_weight


def _pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 1×1 conv (stride 1, no padding) mapping x's channels through a (channels, r) matrix, as one bmm on
    NCHW-contiguous input: oneDNN's rank-r 1×1 conv costs 2-4× as much on CPU, forward and backward
    (``python benchmarks/flora.py --pointwise``)."""
    n, channels, rank = x.shape[0], x.shape[1], weight.shape[1]
    if x.is_contiguous():
        return torch.bmm(weight.t().expand(n, -1, -1), x.view(n, channels, -1)).view(n, rank, *x.shape[2:])
    dims = x.dim() - 2
    return _conv(x, weight.t().reshape(rank, channels, *([1] * dims)), [1] * dims, [0] * dims, [1] * dims)


def _pointwise_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool, need_weight: bool):
    """Gradients of :func:`_pointwise` for x and the (channels, r) weight (contiguous, in its layout)."""
    n, channels, rank = x.shape[0], x.shape[1], weight.shape[1]
    if not x.is_contiguous():
        dims = x.dim() - 2
        grad_x, grad_kernel = _conv_backward(grad, x, weight.t().reshape(rank, channels, *([1] * dims)),
                                             [1] * dims, [0] * dims, [1] * dims, need_x, need_weight)
        return grad_x, None if grad_kernel is None else grad_kernel.reshape(rank, channels).t()
    g = grad.reshape(n, rank, -1)
    grad_x = torch.bmm(weight.expand(n, -1, -1), g).view(x.shape) if need_x else None
    grad_weight = torch.bmm(x.view(n, channels, -1), g.transpose(1, 2)).sum(0) if need_weight else None
    return grad_x, grad_weight


class _ConvBranch(torch.autograd.Function):
    """``out + alpha · up · (mid ⊙ down(pre(x)))`` for a groups=1 conv of the given ``geometry`` (stride, zero
    padding, dilation) and ``kernel`` size. ``pre`` runs as a 1×1 map before ``down``, or is folded into it
    when the kernel is 1×1. 1×1 maps run as :func:`_pointwise`. Factors are cast to x's dtype and their
    gradients back."""

    @staticmethod
    def forward(ctx, x, out, pre, down, up, mid, alpha, in_place, geometry, kernel):
        dtype, rank, dims = x.dtype, down.shape[0], len(kernel)
        one_by_one = all(k == 1 for k in kernel)
        folds = pre is not None and one_by_one
        pointwise = one_by_one and all(s == 1 for s in geometry[0]) and not any(geometry[1])
        down_w = _cast(down, dtype).reshape(rank, -1)
        if folds:
            down_w = torch.mm(down_w, _cast(pre, dtype).t())
        h_in = _pointwise(x, _cast(pre, dtype)) if pre is not None and not folds else None
        source = x if h_in is None else h_in
        h = _pointwise(source, down_w.t()) if pointwise else _conv(source, down_w.view(rank, -1, *kernel), *geometry)
        hm = h if mid is None else h * _cast(mid, dtype).view(-1, *([1] * dims))
        n = h.shape[0]
        up_w, hm_rows = _cast(up, dtype), hm.reshape(n, rank, -1)
        if in_place:
            out.view(n, out.shape[1], -1).baddbmm_(up_w.expand(n, -1, -1), hm_rows, alpha=alpha)
            ctx.mark_dirty(out)
            result = out
        elif out.is_contiguous():
            result = torch.baddbmm(out.view(n, out.shape[1], -1), up_w.expand(n, -1, -1), hm_rows, alpha=alpha)
        else:  # e.g. a channels-last base output: add the branch in the base's layout
            result = out + _scaled(torch.bmm(up_w.expand(n, -1, -1), hm_rows).view(out.shape), alpha)
        # x as it is: the base conv's own backward keeps it (aten's convolution saves its input unconditionally)
        ctx.save_for_backward(x, h_in, h, pre, down, up, mid, down_w)
        ctx.alpha, ctx.geometry, ctx.kernel, ctx.folds, ctx.pointwise = alpha, geometry, kernel, folds, pointwise
        ctx.out_shape = out.shape
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, h_in, h, pre, down, up, mid, down_w = ctx.saved_tensors
        need_x, need_out, need_pre, need_down, need_up, need_mid = ctx.needs_input_grad[:6]
        alpha, folds, dtype = ctx.alpha, ctx.folds, x.dtype
        n, rank, dims = h.shape[0], h.shape[1], h.dim() - 2
        mid_view = None if mid is None else _cast(mid, dtype).view(-1, *([1] * dims))
        hm = h if mid is None else h * mid_view
        g = grad.reshape(n, grad.shape[1], -1)
        grad_up = _scaled(torch.bmm(g, hm.reshape(n, rank, -1).transpose(1, 2)).sum(0), alpha) if need_up else None
        grad_hm = _scaled(torch.bmm(_cast(up, dtype).t().expand(n, -1, -1), g), alpha).view(h.shape)
        grad_mid = (grad_hm * h).transpose(0, 1).reshape(rank, -1).sum(1) if need_mid else None
        grad_h = grad_hm if mid is None else grad_hm * mid_view

        need_source = need_x or (need_pre and not folds)
        need_down_w = need_down or (need_pre and folds)
        source = x if h_in is None else h_in
        if ctx.pointwise:
            grad_source, grad_down_w = _pointwise_backward(grad_h, source, down_w.t(), need_source, need_down_w)
            grad_down_w = None if grad_down_w is None else grad_down_w.t()
        else:
            grad_source, grad_down_w = _conv_backward(grad_h, source, down_w.view(rank, -1, *ctx.kernel),
                                                      *ctx.geometry, need_source, need_down_w)
        grad_x, grad_pre, grad_down = grad_source, None, grad_down_w
        if folds and need_down_w:
            grad_down, grad_pre = _folded_grads(grad_down_w.reshape(rank, -1), down, pre, need_down, need_pre)
        elif h_in is not None and need_source:
            grad_x, grad_pre = _pointwise_backward(grad_source, x, _cast(pre, dtype), need_x, need_pre)
        return (grad_x if need_x else None, _shaped(grad, ctx.out_shape) if need_out else None,
                _grad_like(grad_pre, pre), _grad_like(grad_down, down), _grad_like(grad_up, up),
                _grad_like(grad_mid, mid), None, None, None, None)


def _composed(x: torch.Tensor, out: torch.Tensor, slot: Slot, down: torch.Tensor, up: torch.Tensor,
              mid: float | torch.Tensor, pre: torch.Tensor | None) -> torch.Tensor:
    """The same branch from stock autograd ops (any padding mode, autocast, second-order gradients)."""
    if pre is not None:
        spatial = (1,) * (len(slot.shape) - 2)
        x = slot.pointwise(x, pre.t().to(x.dtype).reshape(pre.shape[1], pre.shape[0], *spatial))
    rank = down.shape[0]
    up = up.to(out.dtype)
    alpha = 1.0 if isinstance(mid, torch.Tensor) else float(mid)
    if slot.op == "linear":
        h = F.linear(x, down.to(x.dtype))
        if isinstance(mid, torch.Tensor):
            h = h * mid
        # A contiguous (rank, out) right operand makes autograd compute up's gradient as hᵀ·g; with the
        # transposed view it computes (gᵀ·h)ᵀ, which oneDNN runs up to 9x slower for a tall, skinny h.
        up_t = up.t().contiguous()
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, rank).to(out.dtype), up_t,
                           alpha=alpha).view(out.shape)
    h = slot.run(x, down.to(x.dtype).reshape(rank, -1, *slot.shape[2:]), groups=1)  # x may have any channel count
    spatial = (1,) * (len(slot.shape) - 2)
    if isinstance(mid, torch.Tensor):
        h = h * mid.view(rank, *spatial)
    h = h.to(out.dtype)
    if out.is_contiguous() and h.is_contiguous():
        n, c = out.shape[:2]
        return torch.baddbmm(out.view(n, c, -1), up.expand(n, -1, -1), h.view(n, rank, -1),
                             alpha=alpha).view(out.shape)
    return out + slot.pointwise(h, up.view(*up.shape, *spatial)).mul_(alpha)
