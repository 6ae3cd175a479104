"""MAP (LoMAP): the formula and its gradients against an explicit W' reference, ‖ΔW‖_F from the factors, the
zero start under AdamW, merge strengths, and the refusal of a zero base weight."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import visionpeft as vp
from conftest import Wrap, max_rel, perturb
from visionpeft.methods.map import EPS

LAYERS = [
    ("linear", lambda: nn.Linear(7, 5), (3, 4, 7)),
    ("conv2d-strided", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 9)),
    ("conv2d-grouped", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 6, 6)),
    ("conv1d-nobias", lambda: nn.Conv1d(3, 5, 3, bias=False), (2, 3, 8)),
]


def method_of(model, layer="layer"):
    return model.get_submodule(layer).vp_adapters["default"]["weight"]


def explicit_weight(method, weight):
    """a·W0/‖W0‖_F + b·ΔW/max(‖ΔW‖_F, eps), ΔW = s·B·A, as the reference writes it (dense, nothing detached)."""
    update = method.scale * (method.lora_B @ method.lora_A).view(weight.shape)
    return method.base_scale * weight / weight.norm() + method.update_scale * update / update.norm().clamp_min(EPS)


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_outputs_and_gradients_match_the_explicit_weight(name, make, shape):
    base = Wrap(make())
    model = perturb(vp.attach(copy.deepcopy(base), "map", targets=["layer"], rank=2, alpha=4), std=0.3)
    method = method_of(model)
    x = torch.randn(shape, requires_grad=True)
    probe = torch.randn_like(base(x))
    (model(x) * probe).sum().backward()
    ours = {"x": x.grad, **{n: p.grad for n, p in method.named_parameters()}}
    assert set(ours) == {"x", "lora_A", "lora_B", "base_scale", "update_scale"}

    x2 = x.detach().clone().requires_grad_()
    reference = functional_call(base.layer, {"weight": explicit_weight(method, base.layer.weight),
                                             "bias": base.layer.bias}, (x2,))
    assert max_rel(model(x), reference) < 1e-5
    for p in method.parameters():
        p.grad = None
    (reference * probe).sum().backward()
    expected = {"x": x2.grad, **{n: p.grad for n, p in method.named_parameters()}}
    for key in expected:
        assert max_rel(ours[key], expected[key]) < 1e-5, key


def test_update_norm_from_the_factors_and_the_update_has_norm_b():
    model = perturb(vp.attach(Wrap(nn.Linear(9, 6)), "map", targets=["layer"], rank=3), std=0.5)
    method = method_of(model)
    dense = method.scale * method.lora_B @ method.lora_A
    assert max_rel(method.update_scale / method.update_gain(), dense.norm()) < 1e-5
    weight = model.layer.weight
    update = method.delta(weight) - (method.base_gain() - 1) * weight
    assert max_rel(update.norm(), method.update_scale.abs()) < 1e-5, "once ΔW ≠ 0 the update's norm is |b|"


def test_adamw_from_the_zero_start_does_not_blow_up():
    torch.manual_seed(1)
    teacher = nn.Linear(8, 4)
    base = Wrap(nn.Linear(8, 4))
    model = vp.attach(copy.deepcopy(base), "map", targets=["layer"], rank=2)
    optimizer = torch.optim.AdamW(vp.trainable_parameters(model).values(), lr=1e-2)
    x = torch.randn(64, 8)
    target = teacher(x).detach()
    losses = []
    for _ in range(40):
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in vp.trainable_parameters(model).values())
        optimizer.step()
        losses.append(loss.item())
    method = method_of(model)
    moved = (base.layer.weight + method.delta(base.layer.weight) - base.layer.weight).norm()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]
    assert moved < 3 * base.layer.weight.norm(), "the first step from B = 0 moves W by about |b|, not 1/eps"


def test_merge_with_a_strength_and_unmerge_are_exact():
    base = Wrap(nn.Linear(6, 5))
    x = torch.randn(3, 6)
    model = perturb(vp.attach(copy.deepcopy(base), "map", targets=["layer"], rank=2), std=0.3)
    method = method_of(model)
    weight = base.layer.weight
    expected = F.linear(x, weight + 0.5 * (explicit_weight(method, weight) - weight), base.layer.bias)
    vp.merge(model, scale=0.5)
    assert max_rel(model(x), expected) < 1e-5
    vp.unmerge(model)
    assert max_rel(model.layer.weight, weight) < 1e-6


def test_zero_base_weight_is_refused_before_anything_changes():
    model = Wrap(nn.Linear(4, 3))
    with torch.no_grad():
        model.layer.weight.zero_()
    with pytest.raises(ValueError, match=r"‖W0‖_F = 0.0"):
        vp.attach(model, "map", targets=["layer"])
    assert type(model.layer) is nn.Linear and not hasattr(model.layer, "vp_adapters")


@pytest.mark.parametrize("options,needle", [(dict(rank=0), "rank=0"), (dict(alpha=float("inf")), "alpha=inf")])
def test_bad_options_are_refused(options, needle):
    model = Wrap(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=needle):
        vp.attach(model, "map", targets=["layer"], **options)
    assert type(model.layer) is nn.Linear


def test_command_line_lists_dora_and_map_with_their_options(capsys):
    from visionpeft.cli import _methods

    _methods(None)
    lines = capsys.readouterr().out.splitlines()
    for name in ("dora", "map"):
        start = lines.index(name) + 1
        block = lines[start:start + 4]
        assert [line.split()[0] for line in block] == ["rank", "alpha", "dropout", "rslora"], name
    start = lines.index("map") + 1
    assert lines[start + 4].split()[0] == "beta_init"


def test_beta_init_sets_the_update_length_and_attach_stays_exact():
    base = Wrap(nn.Linear(7, 5))
    x = torch.randn(3, 7)
    model = vp.attach(copy.deepcopy(base), "map", targets=["layer"], rank=2, beta_init=0.1)
    method = method_of(model)
    assert method.update_scale.item() == pytest.approx(0.1)
    assert max_rel(model(x), base(x)) < 1e-6
    with torch.no_grad():
        method.lora_B.normal_()
    weight = model.layer.weight
    update = method.delta(weight) - (method.base_gain() - 1) * weight
    assert max_rel(update.norm(), torch.tensor(0.1)) < 1e-5, "the update's norm is b0 once B moves"


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), True])
def test_beta_init_must_be_finite_and_positive(value):
    model = Wrap(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=f"beta_init={value!r}"):
        vp.attach(model, "map", targets=["layer"], beta_init=value)
    assert type(model.layer) is nn.Linear


@pytest.mark.parametrize("lr", [1e-4, 1e-2])
@pytest.mark.parametrize("beta_init", [1.0, 0.01])
def test_the_first_adamw_step_moves_the_weight_by_beta_init_whatever_the_lr(lr, beta_init):
    torch.manual_seed(0)
    base = Wrap(nn.Linear(8, 4))
    model = vp.attach(copy.deepcopy(base), "map", targets=["layer"], rank=2, beta_init=beta_init)
    method = method_of(model)
    optimizer = torch.optim.AdamW([method.lora_A, method.lora_B], lr=lr)
    F.mse_loss(model(torch.randn(16, 8)), torch.randn(16, 4)).backward()
    optimizer.step()
    weight = base.layer.weight
    assert max_rel(method.delta(weight).norm(), torch.tensor(beta_init)) < 1e-4
