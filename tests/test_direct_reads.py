"""A layer whose weight an enclosing module reads directly (F.linear(x, self.qkv.weight, ...)) trains and infers
with its adapter: the weight attribute carries W + ΔW while that forward runs."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionpeft as vp
from conftest import max_rel, perturb


class ReadsChildWeights(nn.Module):
    """A parent that runs its children's ops itself, as timm's EVA / BEiT attention does with ``qkv``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 4)  # called normally

    def forward(self, x):
        h = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1).mean((2, 3))
        h = F.linear(h, self.fc.weight, torch.zeros(6))
        return self.out(h)


class Outer(nn.Module):
    """A grandparent that reads a grandchild's weight."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(5, 5))

    def forward(self, x):
        return F.linear(x, self.inner[0].weight) + self.inner(x)


def _check(model, inputs, method="lora", **options):
    """attach is exact, the adapter trains, its effect is the layer's W + ΔW, merged equals unmerged."""
    base = copy.deepcopy(model).eval()
    model.eval()
    y0 = model(*inputs).detach()
    vp.attach(model, method, **options)
    assert torch.equal(model(*inputs), y0)
    perturb(model, std=0.01 if method == "nola" else 0.3)  # NOLA sums many unit bases: keep its ΔW moderate
    y1 = model(*inputs)
    assert max_rel(y1, y0) > 1e-4, "the adapter must change the output"
    y1.square().sum().backward()
    trainable = vp.trainable_parameters(model)
    assert trainable
    for name, param in trainable.items():
        assert param.grad is not None and (not param.numel() or param.grad.abs().sum() > 0), f"{name} gets no gradient"
    vp.merge(model)
    assert max_rel(model(*inputs).detach(), y1.detach()) < 1e-5
    vp.unmerge(model)
    with vp.disabled(model):
        assert max_rel(model(*inputs).detach(), y0) < 1e-5  # after a merge round trip: float round-off
    vp.detach(model, merge=False)
    assert max_rel(model(*inputs).detach(), y0) < 1e-5
    assert not any(h for m in model.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()))
    assert set(model.state_dict()) == set(base.state_dict())
    return y1


def test_parent_reading_child_weights_trains_the_adapters():
    model = ReadsChildWeights()
    x = torch.randn(2, 3, 5, 5)
    vp.attach(model, "lora", targets=["conv", "fc", "out"], rank=2)
    perturb(model, std=0.3)
    effective = {name: model.get_submodule(name).vp_delta("default", "weight") for name in ("conv", "fc")}
    raw = {name: model.get_submodule(name).weight for name in ("conv", "fc")}
    h = F.conv2d(x, raw["conv"] + effective["conv"], model.conv.bias, padding=1).mean((2, 3))
    expected = model.out(F.linear(h, raw["fc"] + effective["fc"], torch.zeros(6)))
    assert torch.allclose(model(x), expected, atol=1e-6)
    # outside a forward the attribute is the stored parameter, untouched
    assert isinstance(model.fc.weight, nn.Parameter) and not model.fc.weight.requires_grad


@pytest.mark.parametrize("method", vp.methods())
def test_every_method_trains_through_a_direct_read(method):
    options = {} if method in ("svd", "clip-svd", "sara") else {"rank": 2}
    _check(ReadsChildWeights(), (torch.randn(2, 3, 5, 5),), method, targets=["conv", "fc", "out"], **options)


def test_grandparent_read_is_carried_too():
    _check(Outer(), (torch.randn(3, 5),), targets=["inner.0"], rank=2)


def test_save_load_and_deepcopy_keep_the_carried_weight(tmp_path):
    model = ReadsChildWeights().eval()
    x = torch.randn(2, 3, 5, 5)
    vp.attach(model, "lora", targets=["conv", "fc"], rank=2)
    perturb(model, std=0.3)
    y = model(x)
    vp.save(model, tmp_path)
    fresh = ReadsChildWeights().eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".vp_adapters." not in k})
    loaded = vp.load(fresh, tmp_path)
    assert torch.equal(loaded(x), y)
    assert torch.equal(copy.deepcopy(model)(x), y)


def test_routing_refuses_a_directly_read_layer():
    model = ReadsChildWeights()
    vp.attach(model, "lora", targets=["fc"], rank=2, name="a")
    with pytest.raises(ValueError, match="reads that weight directly"):
        with vp.routing(model, ["a", None]):
            model(torch.randn(2, 3, 5, 5))


def _timm(name, **kw):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=3, **kw)


@pytest.mark.parametrize("name, kw", [
    ("eva02_tiny_patch14_224", dict(img_size=28, depth=2, embed_dim=32, num_heads=2)),
    ("beit_base_patch16_224", dict(img_size=32, depth=2, embed_dim=32, num_heads=2)),
    ("swinv2_tiny_window8_256", dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2))),
])
def test_timm_attention_that_reads_qkv_weight_trains(name, kw):
    model = _timm(name, **kw)
    with torch.no_grad():  # Swin-V2 starts its post-norms at zero, which would hide the attention branch
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
    size = kw["img_size"]
    attn = next(m for m in model.modules() if hasattr(m, "qkv") and getattr(m, "q_bias", None) is not None)
    assert attn.q_bias is not None  # the F.linear(x, self.qkv.weight, qkv_bias) path
    _check(model, (torch.randn(2, 3, size, size),), targets=["qkv"], rank=2)
