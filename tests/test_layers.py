"""Every method on every layer kind against an explicit W + ΔW reference, including the cases the anchor
libraries get wrong: MultiheadAttention's out_proj (PEFT applies it twice, LyCORIS not at all),
dilated convs and padding modes (PEFT's conv LoRA drops them), grouped-conv merges (refused)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import create_conv2d
from torch import nn

import visionpeft as vp
from conftest import Wrap, max_rel, perturb
from visionpeft.methods import get_method


METHODS = {
    "lora": ("lora", dict(rank=2)),
    "flora": ("flora", dict(rank=2)),
    "flora-weight-path": ("flora", dict(rank=2, path="weight")),
    "svd": ("svd", dict()),
    "svd-weight-path": ("svd", dict(path="weight", rank_ratio=0.5)),
    "snella": ("snella", dict(rank=2, init_density=0.5)),
    "snell": ("snell", dict(rank=2, density=0.5)),
    "sara": ("sara", dict(density=0.3)),
    "sara-sparse-path": ("sara", dict(density=0.3, path="sparse")),
    "dora": ("dora", dict(rank=2)),
    "map": ("map", dict(rank=2)),
    "mora-sharing": ("mora", dict(rank=2, operator="sharing")),
    "mora-rotation": ("mora", dict(rank=2, operator="rotation")),
    "nola": ("nola", dict(rank=2, num_basis=(4, 3))),
    "alpha-lora": ("alpha-lora", dict(rank=2, scale_bias=False)),  # W + ΔW, the bias as it was (tests/test_alpha_lora.py)
}


def deltas(layer, adapter="default"):
    """The method's own ΔW per slot (each method's tests check delta() against its formula)."""
    return {slot: layer.vp_delta(adapter, slot) for slot in layer.vp_adapters[adapter]}


CONVS = [
    ("conv1d", lambda: nn.Conv1d(4, 6, 3), (2, 4, 11)),
    ("conv1d-stride-dilation-same", lambda: nn.Conv1d(4, 6, 3, padding="same", dilation=2), (2, 4, 11)),
    ("conv2d-dilated", lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2), (2, 4, 9, 9)),
    ("conv2d-stride", lambda: nn.Conv2d(4, 6, (3, 5), stride=2, padding=(1, 2)), (2, 4, 9, 10)),
    ("conv2d-valid", lambda: nn.Conv2d(4, 6, 3, padding="valid"), (2, 4, 7, 7)),
    ("conv2d-reflect", lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (2, 4, 8, 8)),
    ("conv2d-circular-dilated", lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="circular"), (2, 4, 8, 8)),
    ("conv2d-replicate-same", lambda: nn.Conv2d(4, 6, 3, padding="same", padding_mode="replicate"), (2, 4, 8, 8)),
    ("conv2d-grouped", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 8, 8)),
    ("conv2d-depthwise", lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (2, 6, 8, 8)),
    ("conv3d", lambda: nn.Conv3d(3, 4, 3, padding=1, stride=(1, 2, 2)), (1, 3, 5, 6, 6)),
    ("conv3d-dilated-grouped", lambda: nn.Conv3d(4, 4, 3, padding=2, dilation=2, groups=2), (1, 4, 5, 6, 6)),
    ("timm-same-stride", lambda: create_conv2d(4, 6, 3, stride=2, padding="same"), (2, 4, 9, 9)),
    ("timm-same-depthwise", lambda: create_conv2d(6, 6, 3, stride=2, padding="same", groups=6), (2, 6, 9, 9)),
    ("linear", lambda: nn.Linear(7, 5), (3, 4, 7)),
    ("linear-nobias", lambda: nn.Linear(7, 5, bias=False), (3, 7)),
]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("name,make,shape", CONVS, ids=[c[0] for c in CONVS])
def test_linear_and_conv_match_explicit_reference(name, make, shape, dropout, method, tmp_path):
    base = Wrap(make()).eval()
    x = torch.randn(shape)
    y0 = base(x)
    method_name, options = METHODS[method]
    if dropout:
        if "dropout" not in get_method(method_name).options:
            pytest.skip(f"{method_name} has no dropout")
        if name.startswith("timm-same"):
            pytest.skip("a conv with its own forward (dynamic same padding) runs W + ΔW, with no input of its own")
        options = dict(options, dropout=dropout)
    model = vp.attach(copy.deepcopy(base), method_name, targets=["layer"], **options).eval()
    assert torch.equal(model(x), y0), "attach must change nothing"
    perturb(model)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        reference.layer.weight += deltas(model.layer)["weight"]
    expected = reference(x)
    y1 = model(x)
    assert max_rel(y1, y0) > 1e-3, "a perturbed adapter must have an effect"
    assert max_rel(y1, expected) < 1e-5
    if dropout:  # dropout acts only on the adapter's input, and only in training
        model.train()
        assert not torch.allclose(model(x), expected, atol=1e-6)
        model.eval()
    vp.merge(model)
    assert max_rel(model.layer.weight, reference.layer.weight) < 1e-6
    assert max_rel(model(x), expected) < 1e-5
    vp.unmerge(model)
    assert max_rel(model.layer.weight, base.layer.weight) < 1e-6
    vp.save(model, tmp_path)
    loaded = vp.load(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(loaded(x), y1)
    vp.detach(model, merge=True)
    assert type(model.layer) is type(base.layer)
    assert max_rel(model(x), expected) < 1e-5
    vp.detach(loaded, merge=False)
    assert torch.equal(loaded(x), y0)


def test_conv_bias_and_padding_mode_untouched():
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    model = vp.attach(Wrap(conv), "lora", targets=["layer"])
    assert model.layer.padding_mode == "reflect"
    assert not model.layer.bias.requires_grad and not model.layer.weight.requires_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "layer.vp_adapters.default.weight.lora_A", "layer.vp_adapters.default.weight.lora_B"}


def mha_reference(mha, deltas):
    ref = copy.deepcopy(mha)
    with torch.no_grad():
        for slot, d in deltas.items():
            if slot == "out_proj":
                ref.out_proj.weight += d
            else:
                name = {"in_proj": "in_proj_weight", "q": "q_proj_weight", "k": "k_proj_weight", "v": "v_proj_weight"}[slot]
                getattr(ref, name).add_(d)
    return ref


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 5])
def test_multihead_attention_matches_reference(batch_first, kdim, method, tmp_path):
    mha = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=batch_first).eval()
    base = Wrap(mha)
    lq = (2, 3, 8) if batch_first else (3, 2, 8)
    lk = lq[:-1] + (kdim or 8,)
    q, k = torch.randn(lq), torch.randn(lk)
    y0 = base(q, k, k)[0]
    method_name, options = METHODS[method]
    model = vp.attach(copy.deepcopy(base), method_name, targets=["layer"], **options).eval()
    expected_slots = ["in_proj", "out_proj"] if kdim is None else ["q", "k", "v", "out_proj"]
    assert list(model.layer.vp_adapters["default"].keys()) == expected_slots
    assert torch.equal(model(q, k, k)[0], y0)
    perturb(model)
    expected = mha_reference(mha, deltas(model.layer))(q, k, k)
    out, weights = model(q, k, k)
    assert max_rel(out, expected[0]) < 1e-5, "out_proj's delta must be applied exactly once"
    assert max_rel(weights, expected[1]) < 1e-5
    with torch.no_grad():  # the inference fast path of nn.MultiheadAttention
        assert max_rel(model(q, k, k, need_weights=False)[0], expected[0]) < 1e-5
    vp.merge(model)
    assert max_rel(model(q, k, k)[0], expected[0]) < 1e-5
    vp.unmerge(model)
    vp.save(model, tmp_path)
    loaded = vp.load(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(loaded(q, k, k)[0], out)
    vp.detach(model, merge=True)
    assert type(model.layer) is nn.MultiheadAttention
    assert max_rel(model(q, k, k)[0], expected[0]) < 1e-5


@pytest.mark.parametrize("method", list(METHODS))
def test_mha_masks_and_gradients_flow_to_adapter(method):
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    method_name, options = METHODS[method]
    model = vp.attach(Wrap(mha), method_name, targets=["layer"], **options)
    perturb(model)
    q = torch.randn(2, 4, 8)
    mask = torch.tensor([[False, False, True, True], [False, False, False, False]])
    out, _ = model(q, q, q, key_padding_mask=mask, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    out.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[3] for n in grads} == {"in_proj", "out_proj"}, "both slots train"
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert mha.in_proj_weight.grad is None


@pytest.mark.parametrize("method", list(METHODS))
def test_targeting_out_proj_adapts_the_attention_module(method):
    """out_proj.forward never runs inside MultiheadAttention: its adapter must still act."""
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    base = Wrap(mha)
    q = torch.randn(2, 3, 8)
    method_name, options = METHODS[method]
    model = vp.attach(copy.deepcopy(base), method_name, targets=["out_proj"], **options).eval()
    assert list(model.layer.vp_adapters["default"].keys()) == ["out_proj"]
    assert type(model.layer.out_proj) is type(mha.out_proj)
    perturb(model)
    assert max_rel(model(q, q, q)[0], mha_reference(mha, deltas(model.layer))(q, q, q)[0]) < 1e-5


@pytest.mark.parametrize("method", list(METHODS))
def test_transformers_conv1d(method, tmp_path):
    from transformers.pytorch_utils import Conv1D

    base = Wrap(Conv1D(9, 4)).eval()  # nf=9 outputs, nx=4 inputs, weight stored (4, 9)
    with torch.no_grad():
        base.layer.weight.normal_()
    x = torch.randn(2, 3, 4)
    y0 = base(x)
    method_name, options = METHODS[method]
    model = vp.attach(copy.deepcopy(base), method_name, targets=["layer"], **options)
    assert torch.equal(model(x), y0)
    perturb(model)
    d = deltas(model.layer)["weight"]
    assert d.shape == (9, 4)
    expected = F.linear(x, base.layer.weight.t() + d, base.layer.bias)
    assert max_rel(model(x), expected) < 1e-5
    vp.merge(model)
    assert max_rel(model.layer.weight, (base.layer.weight.t() + d).t()) < 1e-6
    vp.unmerge(model)
    vp.save(model, tmp_path)
    assert max_rel(vp.load(copy.deepcopy(base), tmp_path)(x), expected) < 1e-5


@pytest.mark.parametrize("method", list(METHODS))
def test_generic_weight_module_uses_its_own_forward(method):
    base = Wrap(nn.Embedding(10, 4))
    idx = torch.tensor([[1, 2, 3]])
    method_name, options = METHODS[method]
    model = vp.attach(copy.deepcopy(base), method_name, targets=["layer"], **options)
    perturb(model)
    d = deltas(model.layer)["weight"]
    assert max_rel(model(idx), F.embedding(idx, base.layer.weight + d)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases(dtype):
    base = Wrap(nn.Linear(16, 8)).to(dtype)
    x = torch.randn(4, 16, dtype=dtype)
    model = vp.attach(copy.deepcopy(base), "lora", targets=["layer"], rank=4)
    method = model.layer.vp_adapters["default"]["weight"]
    assert method.lora_A.dtype == torch.float32, "adapters train in float32 on half bases"
    assert torch.equal(model(x), base(x))
    perturb(model)
    y = model(x)
    assert y.dtype == dtype
    expected = F.linear(x.float(), base.layer.weight.float() + deltas(model.layer)["weight"], base.layer.bias.float())
    assert max_rel(y.float(), expected) < 2e-2
    vp.merge(model)
    merged = (base.layer.weight.float() + deltas(model.layer)["weight"]).to(dtype)
    assert torch.equal(model.layer.weight, merged), "merge is computed in float32 and cast back once"
    vp.unmerge(model)
    assert max_rel(model.layer.weight.float(), base.layer.weight.float()) < 1e-2


def test_activation_path_keeps_no_weight_sized_tensor_for_backward():
    """LoRA on Linear saves only x, A, B and the rank-sized activation for backward."""
    layer = nn.Linear(256, 512)
    model = vp.attach(Wrap(layer), "lora", targets=["layer"], rank=4)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(3, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    assert sum(1 for s in saved if s >= 256 * 512) <= 1  # the frozen W itself, needed for dL/dx
