"""vp.routing: a mixed batch is exact against running each sample alone, for every method and in training."""
import contextlib
import copy

import pytest
import torch
from torch import nn

import visionpeft as vp
from conftest import RecordCalls, perturb
from visionpeft.models import build

PER_SAMPLE = ["a", None, "b", "a", "c", "b"]
CONTIGUOUS = ["a", "a", None, "b", "b", "c"]  # each adapter's samples consecutive


def alone(model, per_sample, x, run=lambda m, x: m(x)):
    """Each sample on its own with its adapter the only active one."""
    outs = []
    for i, name in enumerate(per_sample):
        with vp.disabled(model) if name is None else contextlib.nullcontext():
            if name is not None:
                vp.set_active(model, name)
            outs.append(run(model, x[i:i + 1]))
    return torch.cat(outs)


class Net(nn.Module):
    """Linear (activation path), a grouped conv (weight path) and attention (weight path through torch's forward)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.fc(h).mean(1)


@pytest.mark.parametrize("per_sample", [PER_SAMPLE, CONTIGUOUS])
@pytest.mark.parametrize("methods", [("lora", "lora", "lora"), ("flora", "svd", "snella"), ("sara", "lora", "svd"),
                                     ("mora", "nola", "alpha-lora")])
def test_mixed_batch_equals_each_sample_alone(methods, per_sample):
    model = Net().eval()
    options = {"snella": {}, "sara": {"density": 0.2}, "nola": {"num_basis": (8, 8)}}
    for name, method in zip("abc", methods):
        vp.attach(model, method, targets=["conv", "attn", "fc"], name=name, **options.get(method, {}))
    perturb(model)
    x = torch.randn(len(per_sample), 4, 6, 6)
    with torch.no_grad():
        with vp.routing(model, per_sample):
            mixed = model(x)
        expected = alone(copy.deepcopy(model), per_sample, x)
    assert torch.allclose(mixed, expected, atol=1e-5, rtol=1e-4)


class Conv1D(nn.Module):
    """A linear layer with its weight stored as (in, out), as transformers' GPT-2 ``Conv1D``: a base op of its own,
    which routing may not replace with a GEMM of its own."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.nf = out_features
        self.weight = nn.Parameter(torch.randn(in_features, out_features) / in_features ** 0.5)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


def stacked_linears(linear=nn.Linear, bias=True):
    """Two Linears; "a" (rank 2) and "b" (rank 3) adapt both, "c" (rank 1) only the second."""
    model = nn.Sequential(linear(8, 8, bias=bias), linear(8, 8, bias=bias))
    vp.attach(model, "lora", targets=["0", "1"], name="a", rank=2)
    vp.attach(model, "lora", targets=["0", "1"], name="b", rank=3)
    vp.attach(model, "lora", targets=["1"], name="c", rank=1)
    perturb(model)
    return model


def routed(model, per_sample, x, *ops):
    """The routed output without autograd, each sample's output alone, and the calls to each of ``ops``."""
    records = [RecordCalls(op) for op in ops]
    with torch.no_grad(), vp.routing(model, per_sample), contextlib.ExitStack() as stack:
        for record in records:
            stack.enter_context(record)
        mixed = model(x)
    with torch.no_grad():
        expected = alone(copy.deepcopy(model), per_sample, x)
    return mixed, expected, [record.calls for record in records]


@pytest.mark.parametrize("bias", [True, False])
def test_low_rank_branches_write_the_output_and_the_base_gemm_adds_into_it(bias):
    model = stacked_linears(bias=bias)
    x = torch.randn(len(PER_SAMPLE), 8)
    mixed, expected, (accumulate, batched, base) = routed(
        model, PER_SAMPLE, x, torch.ops.aten.addmm_.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default)
    assert torch.allclose(mixed, expected, atol=1e-6, rtol=1e-5)
    # per layer: the per-sample factors (zero-padded to the layer's largest rank, plus the bias as one more rank) as
    # one down and one up product that writes the output, then the base GEMM once over all 6 rows into it
    up_rank = 3 + bias
    assert [tuple(call[1].shape) for call in batched] == [(6, 8, 3), (6, up_rank, 8)] * 2
    assert [call[1].shape[0] for call in accumulate] == [6, 6] and not base


def test_contiguous_groups_write_their_rows_with_the_products_of_one_adapter():
    model = stacked_linears()
    x = torch.randn(len(CONTIGUOUS), 8)
    mixed, expected, (up, accumulate, batched) = routed(
        model, CONTIGUOUS, x, torch.ops.aten.mm.out, torch.ops.aten.addmm_.default, torch.ops.aten.bmm.default)
    assert torch.allclose(mixed, expected, atol=1e-6, rtol=1e-5)
    # per layer and adapter one up-projection that writes that adapter's rows ("c" adapts only the second layer),
    # then the base GEMM once over all 6 rows; no batched product
    assert [call[0].shape[0] for call in up] == [2, 2, 2, 2, 1]
    assert [call[1].shape[0] for call in accumulate] == [6, 6] and not batched


@pytest.mark.parametrize("per_sample", [PER_SAMPLE, CONTIGUOUS])
def test_low_rank_branches_beside_a_base_op_of_its_own(per_sample):
    model = stacked_linears(Conv1D)
    x = torch.randn(len(per_sample), 8)
    mixed, expected, (base, accumulate, batched) = routed(
        model, per_sample, x, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default,
        torch.ops.aten.baddbmm_.default)
    assert torch.allclose(mixed, expected, atol=1e-6, rtol=1e-5)
    # the layer's own forward once over all 6 rows, then the branches added in place: per adapter on its slice of
    # rows where its samples are consecutive, else as one batched product of per-sample factors
    assert [call[1].shape[0] for call in base] == [6, 6]
    if per_sample is CONTIGUOUS:
        assert [call[1].shape[0] for call in accumulate] == [2, 2, 2, 2, 1] and not batched
    else:
        assert [tuple(call[1].shape) for call in batched] == [(6, 1, 3)] * 2 and not accumulate


@pytest.mark.parametrize("per_sample", [PER_SAMPLE, CONTIGUOUS])
def test_low_rank_branches_train_as_each_sample_alone(per_sample):
    model = stacked_linears()
    reference = copy.deepcopy(model)
    x = torch.randn(len(per_sample), 8)
    with vp.routing(model, per_sample):
        model(x).square().sum().backward()
    for i, name in enumerate(per_sample):
        if name is not None:
            vp.set_active(reference, name)
            reference(x[i:i + 1]).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys() and len(grads) == 10  # A and B of a, b (two layers each) and c
    assert all(torch.allclose(grads[n], expected[n], atol=1e-5, rtol=1e-4) for n in grads)


def test_training_gradients_equal_those_of_each_sample_alone():
    model = Net()
    for name in "abc":
        vp.attach(model, "lora", targets=["conv", "attn", "fc"], name=name, rank=2)
    perturb(model)
    x = torch.randn(len(PER_SAMPLE), 4, 6, 6)
    reference = copy.deepcopy(model)
    with vp.routing(model, PER_SAMPLE):
        model(x).square().sum().backward()
    for i, name in enumerate(PER_SAMPLE):
        if name is not None:
            vp.set_active(reference, name)
            reference(x[i:i + 1]).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys() and grads
    assert all(torch.allclose(grads[n], expected[n], atol=1e-5, rtol=1e-4) for n in grads)


@pytest.mark.parametrize("per_sample", [PER_SAMPLE, CONTIGUOUS])
def test_vit_mixed_batch(per_sample):
    model, (x,) = build("timm_vit")
    model.eval()
    for name in "abc":
        vp.attach(model, "lora", name=name, rank=2)
    perturb(model)
    x = torch.randn(len(per_sample), *x.shape[1:])
    with torch.no_grad():
        with vp.routing(model, per_sample):
            mixed = model(x)
        expected = alone(copy.deepcopy(model), per_sample, x)
    assert torch.allclose(mixed, expected, atol=1e-5, rtol=1e-4)


def test_bad_input():
    model = nn.Sequential(nn.Linear(8, 8))
    vp.attach(model, "lora", targets=["0"], name="a")
    with pytest.raises(ValueError, match="'zz' is not attached; attached: a"):
        with vp.routing(model, ["a", "zz"]):
            pass
    with pytest.raises(ValueError, match="per_sample has 2 entries but the batch has 3"):
        with vp.routing(model, ["a", None]):
            model(torch.randn(3, 8))
    assert model[0]._vp_route is None
    vp.merge(model)
    with pytest.raises(ValueError, match="unmerge first"):
        with vp.routing(model, ["a"]):
            pass
