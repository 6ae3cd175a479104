"""Convolution whose depthwise weight gradient comes from one grouped forward convolution.

On CPU, PyTorch's weight gradient of a depthwise conv (one input channel per group) costs 5-20× the
forward (ConvNeXt-T's 7×7 layers at batch 8: 94 ms against 14 ms for the first stage). That gradient
is a correlation of each input plane with its output-gradient plane, which is a depthwise convolution
in its own right: fold the batch into the channels, use the gradient planes as (large) kernels, swap
stride and dilation, and sum over the batch. oneDNN runs it at 1.4-3.6× the forward: 4.9-10.4× faster
than aten on NCHW inputs, 1.3-2.1× on channels-last ones (``benchmarks/flora.py --depthwise``).
Adapters that train a depthwise kernel (W + ΔW, or ΔW alone) take this path; every other conv, and any
conv on another device or under autocast, is plain ``F.conv{1,2,3}d``. Like a rebuilt weight, the path
gives no second-order gradients.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _tuple(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return (value,) * dims if isinstance(value, int) else tuple(value)


def takes_fast_weight_gradient(x: torch.Tensor, weight: torch.Tensor, padding, groups: int) -> bool:
    """A depthwise conv (in/groups == 1) on CPU whose weight needs a gradient, with numeric padding."""
    return (groups > 1 and weight.shape[1] == 1 and weight.requires_grad and torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dtype == weight.dtype and not isinstance(padding, str)
            and not torch.is_autocast_enabled("cpu"))


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
         groups: int) -> torch.Tensor:
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)``, same value and gradients."""
    if takes_fast_weight_gradient(x, weight, padding, groups):
        dims = weight.dim() - 2
        return _DepthwiseConv.apply(x, weight, bias, _tuple(stride, dims), _tuple(padding, dims),
                                    _tuple(dilation, dims), groups)
    return CONV_FUNCTIONS[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)


def depthwise_weight_gradient(x: torch.Tensor, grad_output: torch.Tensor, kernel: Sequence[int],
                              stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """∂L/∂W of a depthwise conv, shape (out, 1, *kernel), from its input and output gradient.

    W[o, 0, i] meets x[n, o // m, s·p + d·i] for every output position p (m = out / in channels), so
    ∂L/∂W[o, 0, i] = Σ_n Σ_p g[n, o, p] · x[n, o // m, s·p + d·i]: a conv of the padded input with the
    gradient planes as kernels, dilated by the stride and strided by the dilation, one group per (n, c).
    """
    batch, channels = x.shape[:2]
    out_channels = grad_output.shape[1]
    pad = [side for p in reversed(padding) for side in (p, p)]
    planes = F.pad(x, pad) if any(pad) else x
    planes = planes.reshape(1, batch * channels, *planes.shape[2:])
    kernels = grad_output.reshape(batch * out_channels, 1, *grad_output.shape[2:])
    correlation = CONV_FUNCTIONS[len(kernel)](planes, kernels, None, tuple(dilation), 0, tuple(stride),
                                               batch * channels)
    grad = correlation.reshape(batch, out_channels, *correlation.shape[2:]).sum(0)
    return grad[(slice(None), *(slice(0, k) for k in kernel))].unsqueeze(1)


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.bias_size = None if bias is None else [bias.shape[0]]
        return CONV_FUNCTIONS[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        if need_input or need_bias:
            grad_input, _, grad_bias = torch.ops.aten.convolution_backward(
                grad_output, x, weight, ctx.bias_size, list(stride), list(padding), list(dilation), False,
                [0] * len(stride), groups, [need_input, False, need_bias])
        if need_weight:
            grad_weight = depthwise_weight_gradient(x, grad_output, weight.shape[2:], stride, padding, dilation)
        return grad_input, grad_weight, grad_bias, None, None, None, None
