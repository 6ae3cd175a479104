"""DoRA: the formula and its gradients against an explicit W' reference, PEFT's DoRA as the outside peer, the
activation path's memory (no out×in tensor, nothing output-sized of its own), and the edge cases of the norm."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

import visionpeft as vp
from conftest import Wrap, max_rel, perturb

LAYERS = [
    ("linear", lambda: nn.Linear(7, 5), (3, 4, 7)),
    ("linear-nobias", lambda: nn.Linear(7, 5, bias=False), (6, 7)),
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
    ("conv2d-strided-dilated", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), (2, 4, 9, 9)),
    ("conv2d-grouped", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 6, 6)),
    ("conv2d-depthwise", lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (2, 6, 6, 6)),
    ("conv3d", lambda: nn.Conv3d(3, 4, 3, padding=1), (1, 3, 4, 5, 5)),
]


def method_of(model, layer="layer", slot="weight"):
    return model.get_submodule(layer).vp_adapters["default"][slot]


def explicit_weight(method, weight):
    """m ⊙ V / ‖V‖_row with V = W0 + s·B·A and the norm detached: DoRA as the paper writes it."""
    v = weight + method.scale * (method.lora_B @ method.lora_A).view(weight.shape)
    norms = v.detach().reshape(v.shape[0], -1).norm(dim=1)
    return (method.magnitude / norms).view(-1, *[1] * (v.dim() - 1)) * v


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_outputs_and_gradients_match_the_explicit_weight(name, make, shape):
    base = Wrap(make())
    model = perturb(vp.attach(copy.deepcopy(base), "dora", targets=["layer"], rank=2, alpha=3))
    method = method_of(model)
    x = torch.randn(shape, requires_grad=True)
    probe = torch.randn_like(base(x))
    (model(x) * probe).sum().backward()
    ours = {"x": x.grad, **{n: p.grad for n, p in method.named_parameters()}}

    x2 = x.detach().clone().requires_grad_()
    weight = explicit_weight(method, base.layer.weight)
    reference = functional_call(base.layer, {"weight": weight, "bias": base.layer.bias}, (x2,))
    assert max_rel(model(x), reference) < 1e-5
    for p in method.parameters():
        p.grad = None
    (reference * probe).sum().backward()
    expected = {"x": x2.grad, **{n: p.grad for n, p in method.named_parameters()}}
    for key in expected:
        assert max_rel(ours[key], expected[key]) < 1e-5, key


def test_row_norms_from_the_factors_equal_the_dense_norms_for_every_orientation():
    from transformers.pytorch_utils import Conv1D

    for layer in (nn.Linear(9, 4), Conv1D(6, 5), nn.Conv2d(3, 5, 3), nn.Conv3d(2, 3, (1, 3, 3), groups=1)):
        model = perturb(vp.attach(Wrap(layer), "dora", targets=["layer"], rank=3), std=0.5)
        method = method_of(model)
        weight = model.layer.vp_base("weight")[0]
        dense = (weight + method.scale * (method.lora_B @ method.lora_A).view(weight.shape))
        assert max_rel(method.row_norms(weight), dense.reshape(dense.shape[0], -1).norm(dim=1)) < 1e-5


def _peft_dora(base, targets, rank, alpha):
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_dora=True)
    return inject_adapter_in_model(config, copy.deepcopy(base))


def _copy_into_peft(ours, theirs):
    """PEFT's lora_A, lora_B and magnitude set to ours (conv factors in PEFT's shapes)."""
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if not hasattr(module, "lora_magnitude_vector") or "default" not in module.lora_A:
                continue
            method = ours.get_submodule(name).vp_adapters["default"]["weight"]
            for peft_param, value in ((module.lora_A["default"].weight, method.lora_A),
                                      (module.lora_B["default"].weight, method.lora_B),
                                      (module.lora_magnitude_vector["default"].weight, method.magnitude)):
                peft_param.copy_(value.reshape(peft_param.shape))


def _peft_grads(theirs):
    grads = {}
    for name, module in theirs.named_modules():
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_A:
            grads[name] = (module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad,
                           module.lora_magnitude_vector["default"].weight.grad)
    return grads


def _tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=5)


PEERS = [
    ("linear", lambda: Wrap(nn.Linear(12, 10)), ["layer"], lambda: torch.randn(4, 3, 12)),
    ("conv2d", lambda: Wrap(nn.Conv2d(4, 6, 3, padding=1)), ["layer"], lambda: torch.randn(2, 4, 7, 7)),
    ("timm-vit", _tiny_vit, ["qkv", "fc2"], lambda: torch.randn(2, 3, 32, 32)),
]


@pytest.mark.parametrize("name,make,targets,inputs", PEERS, ids=[p[0] for p in PEERS])
def test_outputs_and_gradients_equal_peft_dora(name, make, targets, inputs):
    base = make()
    ours = perturb(vp.attach(copy.deepcopy(base), "dora", targets=targets, rank=4, alpha=8), std=0.2)
    theirs = _peft_dora(base, targets, rank=4, alpha=8)
    _copy_into_peft(ours, theirs)
    x = inputs()
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    assert max_rel(y_ours, y_theirs) < 1e-5
    probe = torch.randn_like(y_ours)
    (y_ours * probe).sum().backward()
    (y_theirs * probe).sum().backward()
    assert max_rel(x_ours.grad, x_theirs.grad) < 1e-5
    peft_grads = _peft_grads(theirs)
    assert len(peft_grads) == len([m for m in ours.modules() if hasattr(m, "vp_adapters")]) > 0
    for module_name, (grad_a, grad_b, grad_m) in peft_grads.items():
        method = ours.get_submodule(module_name).vp_adapters["default"]["weight"]
        assert max_rel(method.lora_A.grad, grad_a.reshape(method.lora_A.shape)) < 1e-5
        assert max_rel(method.lora_B.grad, grad_b.reshape(method.lora_B.shape)) < 1e-5
        assert max_rel(method.magnitude.grad, grad_m.reshape(method.magnitude.shape)) < 1e-5


class LargestResult(TorchDispatchMode):
    """The largest number of elements any op allocates inside the context (views and in-place results aside)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("layer,shape", [(nn.Linear(256, 384), (2, 4, 256)), (nn.Conv2d(32, 48, 3, padding=1), (1, 32, 4, 4))])
def test_activation_path_builds_no_weight_sized_tensor(layer, shape):
    model = perturb(vp.attach(Wrap(layer), "dora", targets=["layer"], rank=4))
    x = torch.randn(shape, requires_grad=True)
    with LargestResult() as record:
        model(x).square().sum().backward()
    assert record.largest < layer.weight.numel()
    assert record.largest >= model(x).numel()  # the probe does see output-sized results


def test_backward_keeps_one_output_sized_tensor_shared_with_the_output():
    layer = nn.Linear(64, 96)
    model = perturb(vp.attach(Wrap(layer), "dora", targets=["layer"], rank=4))
    x = torch.randn(5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    weight_sized = [t for t in saved if t.numel() >= layer.weight.numel()]
    assert len(weight_sized) == 1 and weight_sized[0].t().data_ptr() == layer.weight.data_ptr()  # W, for dL/dx
    output_sized = [t for t in saved if t.numel() >= y.numel() and t.numel() < layer.weight.numel()]
    assert len(output_sized) == 1 and output_sized[0].shape == y.shape
    assert torch._C._is_cow_tensor(output_sized[0]), "an alias of the output, not a copy"


def test_an_in_place_op_after_the_layer_leaves_the_gradients_right():
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    model = perturb(vp.attach(copy.deepcopy(base), "dora", targets=["0"], rank=2))
    method = method_of(model, "0")
    x = torch.randn(4, 6)
    model(x).sum().backward()
    ours = [p.grad.clone() for p in method.parameters()]
    for p in method.parameters():
        p.grad = None
    hidden = F.linear(x, explicit_weight(method, base[0].weight), base[0].bias)
    base[2](torch.relu(hidden)).sum().backward()
    for got, p in zip(ours, method.parameters()):
        assert max_rel(got, p.grad) < 1e-5


def test_zero_rows_of_the_base_weight_stay_finite_and_unchanged():
    layer = nn.Linear(5, 4)
    with torch.no_grad():
        layer.weight[1] = 0
    base = Wrap(layer)
    x = torch.randn(3, 5)
    model = vp.attach(copy.deepcopy(base), "dora", targets=["layer"], rank=2)
    assert torch.equal(model(x), base(x))
    method = method_of(model)
    with torch.no_grad():
        method.lora_B.normal_()
    y = model(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(method.magnitude.grad).all()
    assert torch.equal(y[:, 1], layer.bias[1].expand(3)), "a zero row has magnitude 0: only its bias remains"
    assert method.lora_B.grad[1].abs().sum() == 0


def test_norm_cache_follows_the_layer_weight():
    """A merged second adapter changes the layer's weight: DoRA's cached ‖W0‖_row must follow it."""
    base = Wrap(nn.Linear(6, 5))
    x = torch.randn(3, 6)
    model = vp.attach(copy.deepcopy(base), "lora", targets=["layer"], name="style", rank=2)
    perturb(model)
    vp.attach(model, "dora", targets=["layer"], name="direction", rank=2)
    model.layer.vp_merge("style", 1.0)
    dora = model.layer.vp_adapters["direction"]["weight"]
    with torch.no_grad():  # DoRA's zero start on the new weight: m = its row norms
        dora.magnitude.copy_(model.layer.weight.norm(dim=1))
    assert max_rel(model(x), F.linear(x, model.layer.weight, model.layer.bias)) < 1e-6


def test_merge_unmerge_with_a_strength_is_exact():
    base = Wrap(nn.Conv2d(3, 4, 3, padding=1))
    x = torch.randn(2, 3, 6, 6)
    model = perturb(vp.attach(copy.deepcopy(base), "dora", targets=["layer"], rank=2), std=0.3)
    method = method_of(model)
    expected = F.conv2d(x, base.layer.weight + 0.5 * (explicit_weight(method, base.layer.weight) - base.layer.weight),
                        base.layer.bias, padding=1)
    vp.merge(model, scale=0.5)
    assert max_rel(model(x), expected) < 1e-5
    vp.unmerge(model)
    assert max_rel(model.layer.weight, base.layer.weight) < 1e-6


def test_dropout_acts_on_the_low_rank_branch_only():
    base = Wrap(nn.Linear(8, 6))
    model = perturb(vp.attach(copy.deepcopy(base), "dora", targets=["layer"], rank=2, dropout=0.5), std=0.3).train()
    method = method_of(model)
    x = torch.randn(4, 8)
    torch.manual_seed(3)
    y = model(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    gain = (method.magnitude / method.row_norms(base.layer.weight))
    expected = gain * (F.linear(x, base.layer.weight) + method.scale * dropped @ method.lora_A.t() @ method.lora_B.t()) \
        + base.layer.bias
    assert max_rel(y, expected) < 1e-5


def test_half_precision_base_trains_float32_factors():
    base = Wrap(nn.Linear(16, 8)).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    model = vp.attach(copy.deepcopy(base), "dora", targets=["layer"], rank=4)
    assert torch.equal(model(x), base(x))
    method = method_of(model)
    assert method.magnitude.dtype == torch.float32
    perturb(model)
    weight = explicit_weight(method, base.layer.weight.float())
    expected = F.linear(x.float(), weight, base.layer.bias.float())
    y = model(x)
    assert y.dtype == torch.bfloat16 and max_rel(y.float(), expected) < 2e-2
    y.float().sum().backward()
    assert method.magnitude.grad is not None and method.lora_A.grad is not None


@pytest.mark.parametrize("options,needle", [
    (dict(rank=0), "rank=0"),
    (dict(alpha=float("inf")), "alpha=inf"),
    (dict(alpha=float("nan")), "alpha=nan"),
    (dict(dropout=1.0), "dropout=1.0"),
])
def test_bad_options_are_refused_before_anything_changes(options, needle):
    model = Wrap(nn.Linear(4, 3))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=needle):
        vp.attach(model, "dora", targets=["layer"], **options)
    assert type(model.layer) is nn.Linear and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_magnitude_reads_and_writes_in_peft_shapes():
    model = vp.attach(Wrap(nn.Conv2d(3, 4, 3)), "dora", targets=["layer"], rank=2)
    method = method_of(model)
    method.set_magnitude(torch.arange(4.0).view(1, 4, 1, 1))
    assert torch.equal(method.magnitude, torch.arange(4.0))
    with pytest.raises(ValueError, match=r"magnitude of shape \(5,\)"):
        method.set_magnitude(torch.ones(5))
    assert torch.equal(method.magnitude, torch.arange(4.0))
    assert "magnitude" in dict(method.named_parameters()) and "base_norms_squared" not in method.state_dict()


@pytest.mark.parametrize("make,shape", [(lambda: nn.Linear(6, 5), (4, 6)), (lambda: nn.Conv2d(3, 4, 3), (2, 3, 6, 6))])
def test_an_unfrozen_layer_gets_the_gradients_of_the_explicit_weight(make, shape):
    """Weight and bias trained fully with the adapter (unfreeze): they get their gradients through the gain too."""
    base = Wrap(make())
    model = perturb(vp.attach(copy.deepcopy(base), "dora", targets=["layer"], unfreeze=["layer"], rank=2))
    method = method_of(model)
    x = torch.randn(shape)
    model(x).square().sum().backward()
    weight, bias = base.layer.weight, base.layer.bias
    functional_call(base.layer, {"weight": explicit_weight(method, weight), "bias": bias}, (x,)).square().sum().backward()
    assert max_rel(model.layer.weight.grad, weight.grad) < 1e-5
    assert max_rel(model.layer.bias.grad, bias.grad) < 1e-5


def test_beside_another_adapter_dora_adds_its_own_delta():
    """With a LoRA active on the same layer, DoRA takes the weight path: the output is W0 + ΔW_lora + ΔW_dora."""
    base = Wrap(nn.Linear(6, 5))
    x = torch.randn(3, 6)
    model = vp.attach(copy.deepcopy(base), "lora", targets=["layer"], name="a", rank=2)
    vp.attach(model, "dora", targets=["layer"], name="b", rank=2)
    perturb(model)
    weight = base.layer.weight + model.layer.vp_delta("a", "weight") + model.layer.vp_delta("b", "weight")
    assert max_rel(model(x), F.linear(x, weight, base.layer.bias)) < 1e-5
