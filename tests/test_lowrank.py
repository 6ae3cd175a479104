"""The low-rank activation path (``visionpeft.methods.lowrank``): the fused autograd functions give the same
value and gradients as the branch built from stock autograd ops, on every op geometry they take, and keep
the layouts and kernels that make them fast (which nothing numeric would notice)."""
import importlib

import pytest
import torch
from torch import nn

import visionpeft as vp
from conftest import RecordCalls, max_rel
from visionpeft.layers.kinds import kind_of

lowrank = importlib.import_module("visionpeft.methods.lowrank")

RANK = 3


def _branch_inputs(module, shape, pre_rank, mid, channels_last, dtype, seed=0):
    torch.manual_seed(seed)
    module = module.to(dtype)
    slot = kind_of(module).slot(module, "weight")
    fan_in = slot.in_features if pre_rank is None else pre_rank * (slot.in_features // slot.shape[1])
    down = torch.randn(RANK, fan_in, dtype=torch.float64, requires_grad=True)
    up = torch.randn(slot.shape[0], RANK, dtype=torch.float64, requires_grad=True)
    pre = None if pre_rank is None else torch.randn(slot.shape[1], pre_rank, dtype=torch.float64, requires_grad=True)
    mid = torch.randn(RANK, dtype=torch.float64, requires_grad=True) if mid else 0.7
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return module, slot, x.requires_grad_(True), down, up, mid, pre


def _transformers_conv1d(fan_in, out):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(out, fan_in)


CASES = {
    "linear": (lambda: nn.Linear(6, 5), (4, 6)),
    "linear-tokens": (lambda: nn.Linear(6, 5), (2, 3, 6)),
    "transformers-conv1d": (lambda: _transformers_conv1d(6, 5), (2, 3, 6)),  # GPT-2's transposed linear
    "conv1d-same": (lambda: nn.Conv1d(6, 5, 3, padding="same", dilation=2), (2, 6, 9)),
    "conv2d": (lambda: nn.Conv2d(6, 5, 3, padding=1), (2, 6, 7, 7)),
    "conv2d-strided-dilated": (lambda: nn.Conv2d(6, 5, 3, stride=2, padding=(2, 1), dilation=2), (2, 6, 9, 8)),
    "conv2d-valid": (lambda: nn.Conv2d(6, 5, (3, 2), padding="valid"), (2, 6, 7, 7)),
    "conv2d-1x1": (lambda: nn.Conv2d(6, 5, 1), (2, 6, 5, 5)),
    "conv2d-1x1-strided": (lambda: nn.Conv2d(6, 5, 1, stride=2), (2, 6, 5, 5)),
    "conv2d-1x1-padded": (lambda: nn.Conv2d(6, 5, 1, padding=1), (2, 6, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(6, 5, (3, 1, 2), padding=(1, 0, 1)), (2, 6, 4, 3, 3)),
    "conv3d-1x1": (lambda: nn.Conv3d(6, 5, 1), (2, 6, 3, 3, 3)),
    # composed fallbacks: a padding mode other than zeros, asymmetric "same" padding
    "conv2d-reflect": (lambda: nn.Conv2d(6, 5, 3, padding=1, padding_mode="reflect"), (2, 6, 7, 7)),
    "conv2d-same-even": (lambda: nn.Conv2d(6, 5, 2, padding="same"), (2, 6, 7, 7)),
}


def _value_and_grads(fn, module, slot, x, down, up, mid, pre, grad=None):
    out = module(x)
    y = fn(x, out, slot, down, up, mid, pre)
    leaves = [t for t in (x, down, up, pre, mid) if isinstance(t, torch.Tensor)]
    grad = torch.randn_like(y) if grad is None else grad
    return y, torch.autograd.grad(y, leaves, grad), grad


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("pre_rank,mid", [(None, False), (2, False), (None, True), (4, True)])
def test_fused_branch_matches_the_composed_one(case, pre_rank, mid):
    build, shape = CASES[case]
    inputs = _branch_inputs(build(), shape, pre_rank, mid, False, torch.float64)
    fused, fused_grads, grad = _value_and_grads(lowrank.add_low_rank_output, *inputs)
    ref, ref_grads, _ = _value_and_grads(lowrank._composed, *inputs, grad=grad)
    assert fused.shape == ref.shape and torch.allclose(fused, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(fused_grads, ref_grads):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["conv2d", "conv2d-1x1", "conv3d", "conv3d-1x1"])
@pytest.mark.parametrize("pre_rank", [None, 2])
def test_fused_branch_on_channels_last_input(case, pre_rank):
    build, shape = CASES[case]
    inputs = _branch_inputs(build(), shape, pre_rank, True, True, torch.float64)
    fused, fused_grads, grad = _value_and_grads(lowrank.add_low_rank_output, *inputs)
    ref, ref_grads, _ = _value_and_grads(lowrank._composed, *inputs, grad=grad)
    assert torch.allclose(fused, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(fused_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["linear-tokens", "conv2d", "conv2d-1x1"])
def test_half_precision_base_with_float32_factors(case):
    """Factors run in the activations' dtype and their gradients come back in their own."""
    build, shape = CASES[case]
    module, slot, x, down, up, mid, pre = _branch_inputs(build(), shape, 2, True, False, torch.bfloat16)
    down, up, mid, pre = (t.detach().float().requires_grad_(True) for t in (down, up, mid, pre))
    fused, fused_grads, grad = _value_and_grads(lowrank.add_low_rank_output, module, slot, x, down, up, mid, pre)
    ref, ref_grads, _ = _value_and_grads(lowrank._composed, module, slot, x, down, up, mid, pre, grad=grad)
    assert fused.dtype == torch.bfloat16
    assert ((fused.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    for a, b, leaf in zip(fused_grads, ref_grads, (x, down, up, pre, mid)):
        assert a.dtype == leaf.dtype
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2


def test_frozen_input_and_frozen_factors_get_no_gradient():
    module, slot, x, down, up, mid, pre = _branch_inputs(nn.Conv2d(6, 5, 3, padding=1), (2, 6, 7, 7), 2, True,
                                                         False, torch.float64)
    x.requires_grad_(False)
    pre.requires_grad_(False)
    y = lowrank.add_low_rank_output(x, module(x), slot, down, up, mid, pre)
    y.sum().backward()
    assert x.grad is None and pre.grad is None
    assert all(t.grad is not None for t in (down, up, mid))


def test_up_projection_gradient_is_taken_as_h_transposed_times_g():
    """As hᵀ·g with h (tokens × rank) as a transposed left operand: oneDNN runs the other order, (gᵀ·h)ᵀ, up to
    10× slower for tall inputs (benchmarks/README.md, FLoRA section)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24))
    vp.attach(model, "lora", rank=4, targets=nn.Linear)
    x = torch.randn(64, 16)
    with RecordCalls(torch.ops.aten.mm.default) as record:
        model(x).sum().backward()
    up_grads = [args for args in record.calls if args[0].shape == (4, 64) and args[1].shape == (64, 24)]
    assert len(up_grads) == 1 and not up_grads[0][0].is_contiguous()
    assert not [args for args in record.calls if args[0].shape == (24, 64)], "up's gradient taken as gᵀ·h"


@pytest.mark.parametrize("kernel", [1, 3])
def test_pointwise_maps_are_matmuls_not_convolutions(kernel):
    """A FLoRA 3×3 conv runs only its core through a convolution (U_in is a 1×1 map); on a 1×1 conv the whole
    branch is matrix products: oneDNN's rank-r 1×1 convolution costs 3-7× a bmm on CPU."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, kernel, padding=kernel // 2))
    vp.attach(model, "flora", rank=4, targets=nn.Conv2d)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with RecordCalls(torch.ops.aten.convolution.default) as forward:
        y = model(x)
    with RecordCalls(torch.ops.aten.convolution_backward.default) as backward:
        y.sum().backward()
    branch_convs = 1 if kernel == 3 else 0
    assert len(forward.calls) == 1 + branch_convs  # the base conv, and the core conv
    assert len(backward.calls) == 1 + branch_convs



@pytest.mark.parametrize("host,shape", [
    (lambda: nn.Linear(6, 5), (4, 6)),
    (lambda: nn.Linear(6, 5), (2, 3, 6)),  # the output is a view of the (rows, features) result
    (lambda: nn.Conv2d(6, 5, 3, padding=1), (2, 6, 7, 7)),
])
def test_branch_adds_into_the_base_output_in_place(host, shape):
    torch.manual_seed(0)
    model = nn.Sequential(host())
    reference = nn.Sequential(host())
    reference.load_state_dict(model.state_dict())
    vp.attach(model, "lora", rank=2, targets=["0"])
    lora = model[0].vp_adapters["default"]["weight"]
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(shape, requires_grad=True)
    with RecordCalls(torch.ops.aten.addmm_.default) as addmm_, RecordCalls(torch.ops.aten.baddbmm_.default) as baddbmm_:
        y = model(x)
    assert len(addmm_.calls) + len(baddbmm_.calls) == 1
    y.square().sum().backward()
    with torch.no_grad():
        reference[0].weight += (lora.lora_B @ lora.lora_A).view(model[0].weight.shape) * lora.scale
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference(x_ref)
    y_ref.square().sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(x.grad, x_ref.grad, atol=1e-5)


def test_no_in_place_sum_into_an_output_that_backward_keeps():
    x = torch.randn(4, 6, requires_grad=True)
    linear = torch.nn.functional.linear(x, torch.randn(5, 6))
    kept = torch.relu(linear)  # relu saves its result for backward
    assert lowrank._sum_target(linear) == (linear, True)
    assert lowrank._sum_target(kept) == (kept, False)
    leaf = torch.randn(4, 5, requires_grad=True)
    assert lowrank._sum_target(leaf) == (leaf, False)
    tokens = torch.nn.functional.linear(torch.randn(2, 3, 6, requires_grad=True), torch.randn(5, 6), torch.randn(5))
    target, in_place = lowrank._sum_target(tokens)
    assert in_place and target is tokens._base and target.shape == (6, 5)
    assert not lowrank._sum_target(tokens[:, :2])[1]  # a part of the output: not the whole result


class _ReluLinear(nn.Linear):
    """A linear layer whose own forward does more than x·Wᵀ + b."""

    def forward(self, x):
        return torch.relu(super().forward(x))


@pytest.mark.parametrize("method", ["lora", "flora"])
def test_a_linear_subclass_with_its_own_forward_runs_it_with_the_adapted_weight(method):
    torch.manual_seed(0)
    model = nn.Sequential(_ReluLinear(6, 5))
    vp.attach(model, method, rank=2, targets=["0"])
    for p in vp.trainable_parameters(model).values():
        nn.init.normal_(p)
    x = torch.randn(4, 6)
    delta = model[0].vp_delta("default", "weight")
    expected = torch.relu(torch.nn.functional.linear(x, model[0].weight + delta, model[0].bias))
    assert torch.allclose(model(x), expected, atol=1e-5)


@pytest.mark.parametrize("host,shape", [
    (lambda: nn.Linear(6, 5), (2, 3, 6)),
    (lambda: nn.Conv2d(6, 5, 3, padding=1), (2, 6, 7, 7)),
    (lambda: nn.Conv2d(6, 5, 1), (2, 6, 7, 7)),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_two_adapters_on_one_layer_chain_their_sums(host, shape, channels_last):
    """The second adapter adds into the first one's result (in place or not): gradients reach both and x."""
    torch.manual_seed(0)
    model = nn.Sequential(host())
    if channels_last and len(shape) == 3:
        pytest.skip("channels-last is a conv layout")
    vp.attach(model, "lora", rank=2, targets=["0"], name="a")
    vp.attach(model, "flora", rank=2, targets=["0"], name="b")
    for p in vp.trainable_parameters(model).values():
        nn.init.normal_(p)
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    model(x).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in vp.trainable_parameters(model).items()}
    assert all(g.abs().sum() > 0 for g in grads.values())

    layer = model[0]
    for p in vp.trainable_parameters(model).values():
        p.grad = None
    delta_a, delta_b = layer.vp_delta("a", "weight"), layer.vp_delta("b", "weight")
    weight = layer.weight + delta_a + delta_b
    x_ref = x.detach().clone().requires_grad_(True)
    op = torch.nn.functional.linear if isinstance(layer, nn.Linear) else torch.nn.functional.conv2d
    geometry = {} if isinstance(layer, nn.Linear) else {"padding": layer.padding}
    op(x_ref, weight, layer.bias, **geometry).square().sum().backward()
    assert max_rel(x.grad, x_ref.grad) < 1e-5
    for name, p in vp.trainable_parameters(model).items():
        assert max_rel(grads[name], p.grad) < 1e-5, name


@pytest.mark.parametrize("pre_rank,mid", [(None, False), (2, True)])
def test_out_of_place_sum_on_token_shaped_output(pre_rank, mid):
    """A transposed token input gives a base output no in-place sum may touch: the branch adds out of place and
    hands the output gradient back in the output's own shape."""
    module, slot, x, down, up, mid, pre = _branch_inputs(nn.Linear(6, 5), (3, 2, 6), pre_rank, mid, False,
                                                         torch.float64)
    x = x.detach().transpose(0, 1).requires_grad_(True)
    assert not lowrank._sum_target(module(x))[1]
    fused, fused_grads, grad = _value_and_grads(lowrank.add_low_rank_output, module, slot, x, down, up, mid, pre)
    ref, ref_grads, _ = _value_and_grads(lowrank._composed, module, slot, x, down, up, mid, pre, grad=grad)
    assert torch.allclose(fused, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(fused_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_torch_compile_trains_as_eager():
    """Under torch.compile the branch is the composed form: the fused functions' gradients did not survive tracing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 1), nn.Flatten(2), nn.Linear(16, 4))
    vp.attach(model, "flora", rank=2, targets=[nn.Conv2d, nn.Linear])
    for p in vp.trainable_parameters(model).values():
        nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 3, 4, 4)
    eager = model(x)
    eager.square().sum().backward()
    expected = {name: p.grad.clone() for name, p in vp.trainable_parameters(model).items()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)(x)
    compiled.square().sum().backward()
    assert torch.allclose(compiled, eager, atol=1e-6)
    for name, p in vp.trainable_parameters(model).items():
        assert p.grad is not None and torch.allclose(p.grad, expected[name], atol=1e-5), name
