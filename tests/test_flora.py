"""FLoRA: the Tucker form, its ranks and init, both forward paths, and extraction by tensorly."""
import copy

import pytest
import tensorly
import torch
from torch import nn

import visionpeft as vp
from conftest import Wrap, max_rel, perturb
from visionpeft.methods.flora import mode_ranks, tucker_to_tensor


def flora_of(model):
    return model.layer.vp_adapters["default"]["weight"]


def unfold_rank(t, mode):
    return torch.linalg.matrix_rank(t.movedim(mode, 0).reshape(t.shape[mode], -1).double(), rtol=1e-5).item()


def test_delta_is_the_tucker_product_in_pytorch_mode_order():
    model = vp.attach(Wrap(nn.Conv2d(6, 10, (3, 5))), "flora", targets=["layer"], rank=3, scale=2.0)
    perturb(model)
    m = flora_of(model)
    assert m.ranks == (3, 3, 2, 2) and m.core.shape == (3, 3, 2, 2)
    assert [tuple(f.shape) for f in m.factors] == [(10, 3), (6, 3), (3, 2), (5, 2)]
    with tensorly.backend_context("pytorch"):
        expected = 2.0 * tensorly.tucker_to_tensor((m.core.detach(), [f.detach() for f in m.factors]))
    assert max_rel(m.delta(), expected) < 1e-6
    explicit = 2.0 * torch.einsum("abcd,oa,ib,hc,wd->oihw", m.core, *m.factors)
    assert max_rel(m.delta(), explicit) < 1e-6


@pytest.mark.parametrize("make,ranks", [
    (lambda: nn.Conv2d(8, 16, 3), (4, 4, 2, 2)),
    (lambda: nn.Conv3d(8, 16, (1, 3, 5)), (4, 4, 1, 2, 2)),
    (lambda: nn.Conv1d(8, 16, 7), (4, 4, 2)),
    (lambda: nn.Linear(8, 16), (4, 4)),
    (lambda: nn.Conv2d(3, 16, 3), (4, 3, 2, 2)),  # rank capped at the 3-channel input mode
    (lambda: nn.Conv2d(16, 16, 7, groups=16), (4, 1, 2, 2)),  # depthwise: input mode is in/groups = 1
])
def test_mode_n_unfoldings_have_the_configured_ranks(make, ranks):
    model = vp.attach(Wrap(make()), "flora", targets=["layer"], rank=4)
    perturb(model, std=1.0)
    m = flora_of(model)
    assert m.ranks == ranks
    delta = m.delta().detach()
    assert delta.shape == model.layer.weight.shape
    for mode, r in enumerate(ranks):
        assert unfold_rank(delta, mode) <= r
    assert unfold_rank(delta, 0) == ranks[0], "with random factors the bound is reached"


def test_rank_tuple_is_in_pytorch_order_and_checked():
    model = vp.attach(Wrap(nn.Conv2d(8, 16, 3)), "flora", targets=["layer"], rank=(5, 2, 3, 1))
    assert flora_of(model).ranks == (5, 2, 3, 1)
    assert [tuple(f.shape) for f in flora_of(model).factors] == [(16, 5), (8, 2), (3, 3), (3, 1)]
    with pytest.raises(ValueError, match=r"rank=\(4, 4\) has 2 modes but the weight \(16, 8, 3, 3\) has 4"):
        vp.attach(Wrap(nn.Conv2d(8, 16, 3)), "flora", targets=["layer"], rank=(4, 4))
    with pytest.raises(ValueError, match="rank=0"):
        vp.attach(Wrap(nn.Linear(4, 4)), "flora", targets=["layer"], rank=0)
    assert mode_ranks((16, 8, 7, 7), 4, 3) == (4, 4, 3, 3)


def test_scale_alpha_and_init():
    layer = nn.Linear(512, 512)
    m = flora_of(vp.attach(Wrap(layer), "flora", targets=["layer"], rank=8))
    assert m.scale == 4.0 and torch.count_nonzero(m.core) == 0
    for f in m.factors:  # kaiming-normal, a=sqrt(3), fan_in = rank: std = 1/sqrt(2 r)
        assert abs(f.std().item() - (1 / (2 * 8)) ** 0.5) < 0.02
    assert flora_of(vp.attach(Wrap(nn.Linear(4, 4)), "flora", targets=["layer"], rank=2, alpha=6)).scale == 3.0
    with pytest.raises(ValueError, match="not both"):
        vp.attach(Wrap(nn.Linear(4, 4)), "flora", targets=["layer"], alpha=2, scale=2.0)


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"), (2, 6, 9, 9)),
    (lambda: nn.Conv2d(8, 8, 5, padding="same", groups=4), (2, 8, 7, 7)),
    (lambda: nn.Conv3d(4, 6, 3, padding=1), (1, 4, 4, 5, 5)),
    (lambda: nn.Linear(6, 8), (3, 6)),
])
def test_branch_and_weight_paths_agree(make, shape):
    base = Wrap(make())
    x = torch.randn(shape)
    branch = vp.attach(copy.deepcopy(base), "flora", targets=["layer"], rank=3, path="branch")
    perturb(branch, std=0.5)
    weight = copy.deepcopy(branch)
    flora_of(weight).path = "weight"
    assert max_rel(branch(x), weight(x)) < 1e-5
    branch(x).square().sum().backward()
    weight(x).square().sum().backward()
    for (name, a), b in zip(branch.named_parameters(), weight.parameters()):
        if a.requires_grad:
            assert max_rel(a.grad, b.grad) < 1e-4, name


def test_only_the_core_learns_at_the_first_step():
    model = vp.attach(Wrap(nn.Conv2d(4, 6, 3)), "flora", targets=["layer"], rank=2)
    model(torch.randn(2, 4, 6, 6)).sum().backward()
    m = flora_of(model)
    assert m.core.grad.abs().sum() > 0
    assert all(f.grad is None or f.grad.abs().sum() == 0 for f in m.factors)


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 12, 3, padding=1)
        self.b = nn.Linear(12, 6)

    def forward(self, x):
        return self.b(self.a(x).mean((2, 3)))


def test_extract_recovers_a_planted_tucker_delta_and_a_low_rank_one(tmp_path):
    base = TwoConvs()
    tuned = copy.deepcopy(base)
    torch.manual_seed(1)
    planted = tucker_to_tensor(torch.randn(3, 2, 2, 1), [torch.randn(12, 3), torch.randn(8, 2), torch.randn(3, 2), torch.randn(3, 1)])
    low_rank = torch.randn(6, 2) @ torch.randn(2, 12)
    with torch.no_grad():
        tuned.a.weight += planted
        tuned.b.weight += low_rank
        tuned.b.bias += 1.0
    x = torch.randn(2, 8, 5, 5)
    flora = vp.extract(copy.deepcopy(base), tuned, "flora", targets=["a"], rank=(3, 2, 2, 1), unfreeze=["b"])
    assert "relative reconstruction error" in vp.summary(flora)
    rec = flora.__dict__["_vp_records"]["default"]
    assert rec.reconstruction_error["a:weight"] < 1e-6
    assert torch.equal(flora.b.weight, tuned.b.weight) and flora.b.weight.requires_grad  # unfrozen: copied
    assert max_rel(flora(x), tuned(x)) < 1e-5
    lora = vp.extract(copy.deepcopy(base), tuned, "lora", targets=["b"], rank=2)
    assert lora.__dict__["_vp_records"]["default"].reconstruction_error["b:weight"] < 1e-6
    assert max_rel(lora.b.weight + lora.b.vp_delta("default", "weight"), tuned.b.weight) < 1e-6
    vp.save(flora, tmp_path)
    loaded = vp.load(copy.deepcopy(base), tmp_path)
    assert loaded.__dict__["_vp_records"]["default"].reconstruction_error == rec.reconstruction_error


def test_extract_truncates_to_the_best_low_rank_part():
    base = nn.Sequential(nn.Linear(16, 16))
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned[0].weight += torch.randn(16, 16)
    model = vp.extract(copy.deepcopy(base), tuned, "lora", targets=["0"], rank=4)
    delta = tuned[0].weight - base[0].weight
    s = torch.linalg.svdvals(delta.double())
    best = (s[4:].square().sum().sqrt() / s.square().sum().sqrt()).item()
    assert abs(model.__dict__["_vp_records"]["default"].reconstruction_error["0:weight"] - best) < 1e-5


def test_extract_rejects_other_architectures_and_methods():
    with pytest.raises(ValueError, match="architecture"):
        vp.extract(nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 5)), "lora", targets=["0"])
    with pytest.raises(ValueError, match="unknown method"):
        vp.extract(nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4)), "nope", targets=["0"])
