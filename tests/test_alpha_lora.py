"""α-LoRA: h = α ⊙ (W0·x + b) + s·B(A·x); the bias scale through merges; α apart from the adapter for a bi-level loop."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionpeft as vp
from conftest import Wrap, max_rel, perturb
from visionpeft.methods.alpha_lora import adapter_parameters, alpha_parameters


def transformers_conv1d():
    from transformers.pytorch_utils import Conv1D

    return Conv1D(5, 6)


LAYERS = [
    ("linear", lambda: nn.Linear(6, 5), (3, 4, 6), -1),
    ("conv2d", lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5), 1),
    ("conv2d-grouped", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5), 1),
    ("conv1d-transformers", transformers_conv1d, (2, 3, 6), -1),
]


def along(vector, like, dim):
    shape = [1] * like.dim()
    shape[dim] = -1
    return vector.view(shape)


@pytest.mark.parametrize("scale_bias", [True, False])
@pytest.mark.parametrize("name,make,shape,dim", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_output_is_scaled_base_plus_branch_and_merges_exactly(name, make, shape, dim, scale_bias, tmp_path):
    base = Wrap(make()).eval()
    with torch.no_grad():
        base.layer.bias.normal_()
    x = torch.randn(shape)
    y0 = base(x)
    model = vp.attach(copy.deepcopy(base), "alpha-lora", targets=["layer"], rank=2, scale_bias=scale_bias).eval()
    assert torch.equal(model(x), y0), "α = 1 and B = 0: attaching changes nothing"
    perturb(model, std=0.3)
    method = model.layer.vp_adapters["default"]["weight"]
    alpha = method.base_scale.detach()
    branch = model.layer.vp_delta("default", "weight") - (alpha - 1).view(-1, *[1] * (y0.dim() - 1 if dim == 1 else 1)) \
        * (base.layer.weight.t() if name.endswith("transformers") else base.layer.weight)
    bias = base.layer.bias
    if dim == 1:
        branch_out = F.conv2d(x, branch, padding=1, groups=base.layer.groups)
    else:
        branch_out = F.linear(x, branch)
    scaled = along(alpha, y0, dim) * (y0 if scale_bias else y0 - along(bias, y0, dim))
    expected = scaled + (0 if scale_bias else along(bias, y0, dim)) + branch_out
    y1 = model(x)
    assert max_rel(y1, expected) < 1e-5
    vp.merge(model)
    assert max_rel(model(x), y1) < 1e-5, "merging folds α into the weight and, with scale_bias, into the bias"
    vp.unmerge(model)
    assert max_rel(model.layer.weight, base.layer.weight) < 1e-6 and torch.equal(model.layer.bias, bias)
    vp.save(model, tmp_path)
    assert torch.equal(vp.load(copy.deepcopy(base), tmp_path).eval()(x), y1)
    vp.detach(model, merge=True)
    assert type(model.layer) is type(base.layer) and max_rel(model(x), y1) < 1e-5


def test_attention_takes_the_weight_path_and_merges_consistently():
    base = Wrap(nn.MultiheadAttention(8, 2, batch_first=True)).eval()
    q = torch.randn(2, 3, 8)
    model = vp.attach(copy.deepcopy(base), "alpha-lora", targets=["layer"], rank=2)
    assert torch.equal(model(q, q, q)[0], base(q, q, q)[0])
    perturb(model)
    y1 = model(q, q, q)[0]
    vp.merge(model)
    assert max_rel(model(q, q, q)[0], y1) < 1e-5
    vp.unmerge(model)
    assert torch.equal(model.layer.in_proj_bias, base.layer.in_proj_bias)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_alpha_parameters_are_apart_from_the_adapters():
    model = vp.attach(Toy(), "alpha-lora", targets=["body", "head"], rank=2)
    vp.attach(model, "lora", targets=["body"], name="other", rank=2)
    alphas, rest = alpha_parameters(model), adapter_parameters(model)
    assert sorted(alphas) == ["body.vp_adapters.default.weight.base_scale", "head.vp_adapters.default.weight.base_scale"]
    assert set(alphas) | set(rest) == set(vp.trainable_parameters(model)) and not set(alphas) & set(rest)
    assert alpha_parameters(model, "other") == {}
    assert list(alpha_parameters(model, ["default"])) == sorted(alphas)


def test_a_hand_written_bi_level_loop():
    """Algorithm 1: the adapter's AdamW every step on train batches; α's own Adam every T steps on held-out ones."""
    torch.manual_seed(0)
    teacher = Toy()
    with torch.no_grad():
        teacher.body.weight.mul_(1.5)  # the target task wants the frozen layer scaled
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.body.weight.div_(1.5)
    model = vp.attach(student, "alpha-lora", targets=["body"], rank=2)
    options = vp.adapters(model)["default"]["options"]
    every, alpha_lr = options["alpha_every"], options["alpha_lr"]
    assert (every, alpha_lr) == (10, 5e-3)
    adapter_opt = torch.optim.AdamW(adapter_parameters(model).values(), lr=1e-3)
    alpha_opt = torch.optim.Adam(alpha_parameters(model).values(), lr=alpha_lr)
    alpha = next(iter(alpha_parameters(model).values()))
    train, held_out = torch.randn(40, 32, 8), torch.randn(8, 32, 8)

    def loss_on(x):
        return F.mse_loss(model(x), teacher(x).detach())

    start = loss_on(held_out[0]).item()
    for step, x in enumerate(train, start=1):
        before = alpha.detach().clone()
        adapter_opt.zero_grad()
        loss_on(x).backward()
        adapter_opt.step()
        assert torch.equal(alpha, before), "the adapter's optimizer never moves α"
        if step % every == 0:
            alpha_opt.zero_grad()
            adapter_opt.zero_grad()
            lora_before = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
            loss_on(held_out[step // every - 1]).backward()
            alpha_opt.step()
            assert not torch.equal(alpha, before)
            assert all(torch.equal(p, lora_before[n]) for n, p in adapter_parameters(model).items())
    assert alpha.detach().mean() > 1.0, "α grows towards the teacher's scale"
    assert loss_on(held_out[0]).item() < start


def test_bad_alpha_every_is_refused():
    with pytest.raises(ValueError, match=r"alpha_every=0.*an int >= 1"):
        vp.attach(Toy(), "alpha-lora", targets=["body"], alpha_every=0)
