"""Adapters on quantized linears: bitsandbytes Linear4bit (NF4, FP4) and Linear8bitLt, torchao Int8Tensor linears.

The base stays quantized and frozen, the adapter is float, attaching changes nothing, the adapted output is the
dequantized weight's W + ΔW, methods that need exact weights are refused, and merges requantize with a warning."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionpeft as vp
from conftest import max_rel, perturb
from visionpeft.layers import kind_of
from visionpeft.layers.quantized import RequantizationWarning
from visionpeft.targeting import resolve_targets

bnb = pytest.importorskip("bitsandbytes")

IN, OUT = 64, 48  # bitsandbytes' 4-bit blocks are 64 values


class TwoLayers(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def _float_pair(bias: bool = True) -> TwoLayers:
    return TwoLayers(nn.Linear(IN, OUT, bias=bias), nn.Linear(OUT, IN, bias=bias))


def _bnb_layer(reference: nn.Linear, storage: str, compute_dtype=torch.float32) -> nn.Module:
    bias = reference.bias is not None
    if storage in ("nf4", "fp4"):
        layer = bnb.nn.Linear4bit(reference.in_features, reference.out_features, bias=bias, quant_type=storage,
                                  compute_dtype=compute_dtype)
    else:
        layer = bnb.nn.Linear8bitLt(reference.in_features, reference.out_features, bias=bias, has_fp16_weights=False)
    layer.load_state_dict(reference.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes on .to(device)


def quantized_model(storage: str, bias: bool = True, compute_dtype=torch.float32) -> nn.Module:
    model = _float_pair(bias)
    if storage == "torchao":
        torchao = pytest.importorskip("torchao")
        torchao.quantization.quantize_(model, torchao.quantization.Int8WeightOnlyConfig())
        return model
    return TwoLayers(_bnb_layer(model.first, storage, compute_dtype), _bnb_layer(model.second, storage, compute_dtype))


STORAGES = ["nf4", "fp4", "int8", "torchao"]
METHODS = {
    "lora": dict(rank=4),
    "dora": dict(rank=4),
    "flora": dict(rank=4),
    "nola": dict(rank=4, num_basis=(16, 16)),
    "mora": dict(rank=4),
    "alpha-lora": dict(rank=4),
    "map": dict(rank=4),
    "snella": dict(rank=4, path="activation", init_density=0.5, density=0.5),
}


def _stored(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight
    return weight.qdata if hasattr(weight, "qdata") else weight.data


def _dequantized(layer: nn.Module) -> torch.Tensor:
    return layer._vp_kind.read(layer, "weight").float() if hasattr(layer, "_vp_kind") \
        else kind_of(layer).read(layer, "weight").float()


def _reference(model: nn.Module, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """The two layers run as float linears with the dequantized weight plus the adapter's ΔW."""
    def run(layer, h):
        weight = _dequantized(layer) + layer.vp_delta(adapter, "weight")
        bias = layer.bias.float() if layer.bias is not None else None
        method = layer.vp_adapters[adapter]["weight"]
        if method.name == "alpha-lora" and method.scale_bias and bias is not None:
            bias = bias * method.base_scale  # α scales W0·x + b together on the activation path
        return F.linear(h, weight, bias)

    return run(model.second, torch.relu(run(model.first, x)))


@pytest.mark.parametrize("storage", STORAGES)
def test_slots_see_the_logical_float_weight_and_adapters_are_float(storage):
    model = quantized_model(storage)
    stored_dtype = _stored(model.first).dtype
    vp.attach(model, "lora", targets=["first", "second"], rank=4)
    slot = model.first._vp_slots["weight"]
    assert slot.shape == (OUT, IN) and slot.dtype.is_floating_point and slot.op == "linear"
    lora = model.first.vp_adapters["default"]["weight"]
    assert lora.lora_A.dtype == torch.float32 and lora.lora_A.shape == (4, IN) and lora.lora_B.shape == (OUT, 4)
    assert _stored(model.first).dtype == stored_dtype and not stored_dtype.is_floating_point  # still quantized
    assert not model.first.weight.requires_grad
    assert set(vp.trainable_parameters(model)) == {f"{layer}.vp_adapters.default.weight.{p}"
                                                   for layer in ("first", "second") for p in ("lora_A", "lora_B")}


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("method", list(METHODS))
def test_attach_is_exact_and_trains_beside_the_frozen_quantized_base(storage, method):
    model = quantized_model(storage)
    x = torch.randn(5, IN)
    with torch.no_grad():
        before = model(x)
    stored = [_stored(layer).clone() for layer in (model.first, model.second)]
    vp.attach(model, method, targets=["first", "second"], **METHODS[method])
    with torch.no_grad():
        assert torch.equal(model(x), before)
    perturb(model, std=0.05)
    out = model(x)
    assert max_rel(out, _reference(model, x)) < 2e-3  # the quantized kernel against float math on its weight
    out.square().mean().backward()
    for name, param in vp.trainable_parameters(model).items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for layer, codes in zip((model.first, model.second), stored):
        assert torch.equal(_stored(layer), codes) and layer.weight.grad is None


def test_bnb_compute_dtype_bfloat16_keeps_float32_adapters():
    model = quantized_model("nf4", compute_dtype=torch.bfloat16)
    vp.attach(model, "lora", targets=["first", "second"], rank=4)
    assert model.first._vp_slots["weight"].dtype == torch.bfloat16
    assert model.first.vp_adapters["default"]["weight"].lora_A.dtype == torch.float32
    perturb(model, std=0.05)
    x = torch.randn(3, IN)
    out = model(x)
    assert out.dtype == torch.float32 and max_rel(out, _reference(model, x)) < 3e-2  # bfloat16 products
    out.sum().backward()
    assert model.first.vp_adapters["default"]["weight"].lora_B.grad.abs().sum() > 0


def test_qdora_norms_come_from_the_dequantized_weight_and_stay_cached():
    model = quantized_model("nf4")
    vp.attach(model, "dora", targets=["first"], rank=4)
    dora = model.first.vp_adapters["default"]["weight"]
    weight = _dequantized(model.first)
    assert torch.allclose(dora.magnitude, weight.norm(dim=1), rtol=1e-6)
    x = torch.randn(2, IN)
    model(x)
    cached = dora.base_norms_squared
    model(x)  # a re-read of the same stored weight hits the cache
    assert dora.base_norms_squared is cached
    assert torch.allclose(cached, weight.pow(2).sum(1), rtol=1e-6)


@pytest.mark.parametrize("method,options,reason", [
    ("sara", dict(density=0.1), "in place"),
    ("svd", dict(), "SVD"),
    ("snella", dict(rank=4), "path='weight'"),
    ("snell", dict(rank=4), "path='weight'"),
])
@pytest.mark.parametrize("storage", ["nf4", "int8", "torchao"])
def test_methods_that_need_exact_weights_are_refused_before_anything_changes(storage, method, options, reason):
    model = quantized_model(storage)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as err:
        vp.attach(model, method, targets=["first", "second"], **options)
    message = str(err.value)
    assert "first" in message and "quantized" in message and reason in message and "lora" in message
    assert not any(hasattr(m, "vp_adapters") for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_targets_all_refuses_the_raw_storage_of_a_quantized_weight():
    model = quantized_model("nf4")
    with pytest.raises(ValueError, match="raw codes"):
        vp.attach(model, "sara", targets="all", density=0.1)
    assert not any(hasattr(m, "vp_adapters") for m in model.modules())


def test_a_layer_not_quantized_yet_is_refused_by_name():
    layer = bnb.nn.Linear4bit(IN, OUT, quant_type="nf4")  # quantized only on .to(device)
    with pytest.raises(ValueError, match="first.*no quantized weight yet"):
        vp.attach(TwoLayers(layer, nn.Linear(OUT, IN)), "lora", targets=["first"])


@pytest.mark.parametrize("storage", STORAGES)
def test_merge_requantizes_with_a_warning_and_unmerge_restores_the_stored_weight(storage):
    model = quantized_model(storage)
    vp.attach(model, "lora", targets=["first", "second"], rank=4)
    perturb(model, std=0.05)
    x = torch.randn(4, IN)
    with torch.no_grad():
        adapted = model(x)
    codes = _stored(model.first).clone()
    layers = (model.first, model.second)
    wanted = [_dequantized(layer) + layer.vp_delta("default", "weight").detach() for layer in layers]
    with pytest.warns(RequantizationWarning, match=r"vp.merge wrote into 2 quantized weight.*max abs error") as record:
        vp.merge(model)
    error = max(w.message.error for w in record if isinstance(w.message, RequantizationWarning))
    # the warning reports the true rounding: the largest gap between the requantized weight and W + ΔW
    actual = max(float((_dequantized(layer) - target).abs().max()) for layer, target in zip(layers, wanted))
    assert error == pytest.approx(actual, rel=1e-5) and 0 < error < 0.5
    assert not _stored(model.first).dtype.is_floating_point and not torch.equal(_stored(model.first), codes)
    with torch.no_grad():
        merged = model(x)
        float_math = F.linear(torch.relu(F.linear(x, _dequantized(model.first), model.first.bias.float())),
                              _dequantized(model.second), model.second.bias.float())
    assert max_rel(merged, float_math) < 2e-3  # the merged model runs the requantized weight and nothing else
    if storage in ("int8", "torchao"):  # an 8-bit grid is fine enough to keep the update; 4-bit may round it away
        assert max_rel(merged, adapted) < 0.02
    with torch.no_grad(), vp.disabled(model):
        pass
    with torch.no_grad():
        assert torch.equal(model(x), merged)  # leaving disabled() puts the merged storage back bit for bit
    with warnings.catch_warnings():
        warnings.simplefilter("error", RequantizationWarning)
        vp.unmerge(model)  # the stored weight from before the merge comes back: exact, no warning
    assert torch.equal(_stored(model.first), codes)
    with torch.no_grad():
        assert torch.equal(model(x), adapted)


def test_unmerging_under_a_later_merge_is_lossy_and_says_so():
    model = quantized_model("nf4")
    vp.attach(model, "lora", targets=["first"], rank=4, name="a")
    vp.attach(model, "lora", targets=["first"], rank=4, name="b")
    perturb(model, std=0.05)
    with pytest.warns(RequantizationWarning):
        vp.merge(model, names=["a"])
    with pytest.warns(RequantizationWarning):
        vp.merge(model, names=["b"])
    with pytest.warns(RequantizationWarning, match="lossy"):
        model.first.vp_unmerge("a")  # b's merge is still in the weight: subtract and requantize


def test_detach_with_merge_leaves_a_quantized_layer_holding_the_update():
    model = quantized_model("int8")
    vp.attach(model, "lora", targets=["first", "second"], rank=4)
    perturb(model, std=0.05)
    x = torch.randn(4, IN)
    with torch.no_grad():
        adapted = model(x)
    with pytest.warns(RequantizationWarning, match="vp.detach"):
        vp.detach(model, merge=True)
    assert type(model.first) is bnb.nn.Linear8bitLt and model.first.weight.dtype == torch.int8
    with torch.no_grad():
        assert max_rel(model(x), adapted) < 0.05


@pytest.mark.parametrize("storage", ["nf4", "int8", "torchao"])
def test_save_and_load_onto_a_fresh_quantized_model(storage, tmp_path):
    base = quantized_model(storage)
    fresh = copy.deepcopy(base)
    vp.attach(base, "dora", targets=["first", "second"], rank=4)
    perturb(base, std=0.05)
    x = torch.randn(3, IN)
    with torch.no_grad():
        expected = base(x)
    vp.save(base, tmp_path / "adapter")
    vp.load(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_the_llama_preset_finds_a_bitsandbytes_quantized_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "tiny", quantization_config=quantization,
                                                          device_map="cpu", dtype=torch.float32)
    projections = [f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert all(isinstance(model.get_submodule(p), bnb.nn.Linear4bit) for p in projections)
    assert sorted(t.name for t in resolve_targets(model, None)) == sorted(projections)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        before = model(ids).logits
    vp.attach(model, "lora", rank=4)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    perturb(model, std=0.05)
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for p in vp.trainable_parameters(model).values()]
    assert len(grads) == 2 * len(projections) and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert isinstance(model.model.layers[0].mlp.down_proj.weight, bnb.nn.Params4bit)


@pytest.mark.parametrize("per_sample", [["a", None, "b", "a"], ["a", "a", "b", None]])
@pytest.mark.parametrize("storage", ["nf4", "torchao"])
def test_routing_over_a_quantized_base_equals_each_sample_alone(storage, per_sample):
    # torchao keeps nn.Linear's forward on a quantized weight: routing must still run the layer's own base op
    model = quantized_model(storage)
    for name in ("a", "b"):
        vp.attach(model, "lora", targets=["first", "second"], name=name, rank=4)
    perturb(model)
    x = torch.randn(len(per_sample), IN)
    with torch.no_grad():
        with vp.routing(model, per_sample):
            mixed = model(x)
        expected = []
        for i, name in enumerate(per_sample):
            if name is None:
                with vp.disabled(model):
                    expected.append(model(x[i:i + 1]))
            else:
                vp.set_active(model, name)
                expected.append(model(x[i:i + 1]))
    assert max_rel(mixed, torch.cat(expected)) < 1e-5
