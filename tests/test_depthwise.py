"""The depthwise weight gradient from one grouped forward conv: equal to autograd's, and actually taken.

PyTorch's own CPU kernel for that gradient costs 8-18× the forward (``visionpeft/layers/depthwise.py``),
so an adapter that trains a depthwise kernel must never ask for it.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionpeft as vp
from conftest import RecordCalls, perturb
from visionpeft.layers import depthwise

CASES = [  # dims, channels, multiplier, kernel, stride, padding, dilation, size
    (2, 6, 1, 7, 1, 3, 1, 13),
    (2, 4, 2, 3, 2, 2, 2, 11),
    (2, 5, 1, (3, 5), (2, 1), (1, 0), (1, 2), 12),
    (1, 6, 3, 5, 3, 4, 2, 23),
    (3, 4, 1, 3, 2, 1, 1, 7),
]


@pytest.mark.parametrize("dims, channels, mult, kernel, stride, padding, dilation, size", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_equal_autograds(dims, channels, mult, kernel, stride, padding, dilation, size, bias):
    torch.manual_seed(0)
    kernel = (kernel,) * dims if isinstance(kernel, int) else kernel
    x = torch.randn(3, channels, *(size,) * dims, dtype=torch.float64, requires_grad=True)
    w = torch.randn(channels * mult, 1, *kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(channels * mult, dtype=torch.float64, requires_grad=True) if bias else None
    ref_conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    expected = ref_conv(x, w, b, stride, padding, dilation, channels)
    got = depthwise.conv(x, w, b, stride, padding, dilation, channels)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    g = torch.randn_like(expected)
    inputs = [x, w] + ([b] if bias else [])
    want = torch.autograd.grad(expected, inputs, g)
    have = torch.autograd.grad(got, inputs, g)
    for name, h, e in zip(["input", "weight", "bias"], have, want):
        torch.testing.assert_close(h, e, rtol=1e-10, atol=1e-10, msg=name)


def test_channels_last_input_and_frozen_input():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 1, 3, 3, requires_grad=True)
    expected = torch.autograd.grad(F.conv2d(x, w, None, 1, 1, 1, 8).square().sum(), w)[0]
    got = torch.autograd.grad(depthwise.conv(x, w, None, 1, 1, 1, 8).square().sum(), w)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _record_conv_backward():
    return RecordCalls(torch.ops.aten.convolution_backward.default)


def _masks(record):
    """(weight shape, output mask) of each convolution_backward call."""
    return [(args[2].shape, tuple(args[-1])) for args in record.calls]


def _adapter_gradients(model, x):
    model.zero_grad()
    model(x).square().sum().backward()
    return {name: p.grad.clone() for name, p in vp.trainable_parameters(model).items()}


@pytest.mark.parametrize("method", ["lora", "flora", "snella", "sara"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_an_adapted_depthwise_conv_never_asks_aten_for_its_weight_gradient(method, padding_mode, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 5, padding=2, groups=8, padding_mode=padding_mode))
    options = {"density": 0.5} if method == "sara" else {"rank": 2}
    vp.attach(model, method, targets=nn.Conv2d, **options)
    perturb(model)
    x = torch.randn(2, 8, 9, 9)
    with _record_conv_backward() as record:
        fast = _adapter_gradients(model, x)
    kernel_grads = [mask for shape, mask in _masks(record) if shape == (8, 1, 5, 5) and mask[1]]
    assert not kernel_grads, f"aten computed a depthwise weight gradient: {_masks(record)}"
    monkeypatch.setattr(depthwise, "takes_fast_weight_gradient", lambda *args: False)
    with _record_conv_backward() as record:
        stock = _adapter_gradients(model, x)
    assert any(shape == (8, 1, 5, 5) and mask[1] for shape, mask in _masks(record))  # the recorder sees aten's
    assert fast.keys() == stock.keys() and fast
    for name in fast:
        torch.testing.assert_close(fast[name], stock[name], rtol=1e-4, atol=1e-5, msg=name)
