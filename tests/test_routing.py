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


def stacked_linears():
    """Two Linears; "a" (rank 2) and "b" (rank 3) adapt both, "c" (rank 1) only the second."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    vp.attach(model, "lora", targets=["0", "1"], name="a", rank=2)
    vp.attach(model, "lora", targets=["0", "1"], name="b", rank=3)
    vp.attach(model, "lora", targets=["1"], name="c", rank=1)
    perturb(model)
    return model


def test_low_rank_branches_run_as_one_batched_product_beside_one_base_op():
    model = stacked_linears()
    x = torch.randn(len(PER_SAMPLE), 8)
    with torch.no_grad(), vp.routing(model, PER_SAMPLE), RecordCalls(torch.ops.aten.addmm.default) as base, \
            RecordCalls(torch.ops.aten.bmm.default) as down:
        mixed = model(x)
    with torch.no_grad():
        expected = alone(copy.deepcopy(model), PER_SAMPLE, x)
    assert torch.allclose(mixed, expected, atol=1e-6, rtol=1e-5)
    # per layer: the base op once over all 6 rows, the down-projections as one product of per-sample factors
    # (zero-padded to the layer's largest rank), never one pass per adapter
    assert [call[1].shape[0] for call in base.calls] == [6, 6]
    assert [tuple(call[1].shape) for call in down.calls] == [(6, 8, 3), (6, 8, 3)]


def test_contiguous_groups_run_the_products_of_one_adapter_on_their_slices():
    model = stacked_linears()
    x = torch.randn(len(CONTIGUOUS), 8)
    with torch.no_grad(), vp.routing(model, CONTIGUOUS), RecordCalls(torch.ops.aten.addmm_.default) as up, \
            RecordCalls(torch.ops.aten.bmm.default) as batched:
        mixed = model(x)
    with torch.no_grad():
        expected = alone(copy.deepcopy(model), CONTIGUOUS, x)
    assert torch.allclose(mixed, expected, atol=1e-6, rtol=1e-5)
    # per layer and adapter one in-place up-projection on that adapter's rows ("c" adapts only the second layer);
    # no batched product, no rows for the base samples
    assert [call[1].shape[0] for call in up.calls] == [2, 2, 2, 2, 1] and not batched.calls


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
