"""DoRA in PEFT adapter directories both ways, judged by the installed peft: vp.save(format="peft") of a DoRA
adapter loads in PeftModel.from_pretrained with the same output; vp.load reads a PEFT DoRA directory as "dora" with
PeftModel's output; a magnitude that does not fit its layer is refused and the model left as it was."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import visionpeft as vp
from conftest import perturb
from visionpeft.models import build

peft = pytest.importorskip("peft")

MAGNITUDE = "lora_magnitude_vector"
# family, PEFT target_modules, modules to unfreeze / save
CASES = {
    "timm_vit": (["qkv", "proj", "fc1", "fc2"], ["head"]),
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ["lm_head"]),
    "timm_resnet": (["conv1", "conv2"], ["fc"]),  # conv DoRA: magnitude (1, out, 1, 1)
}


def run(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return getattr(out, "logits", out)


def close(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def peft_dora_directory(family, directory, **config):
    """A PeftModel.save_pretrained directory of a perturbed PEFT DoRA on ``family``; (base, inputs, its output)."""
    target_modules, unfreeze = CASES[family]
    base, inputs = build(family)
    base.eval()
    options = dict(r=4, lora_alpha=8, target_modules=target_modules, modules_to_save=unfreeze, use_dora=True) | config
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_" in name:  # the factors and the magnitudes
                param.add_(torch.randn_like(param) * 0.1)
            elif "modules_to_save" in name:
                param.mul_(1.5)
    reference.eval().save_pretrained(directory)
    return base, inputs, run(reference, inputs)


@pytest.mark.parametrize("family", list(CASES))
def test_visionpeft_dora_to_peft(family, tmp_path):
    _, unfreeze = CASES[family]
    base, inputs = build(family)
    base.eval()
    model = perturb(vp.attach(copy.deepcopy(base), "dora", unfreeze=unfreeze, rank=4, alpha=6), std=0.1)
    expected = run(model, inputs)
    vp.save(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    magnitudes = {k: v for k, v in tensors.items() if k.endswith("." + MAGNITUDE)}
    assert len(magnitudes) == len(config["target_modules"]) > 0
    for key, value in magnitudes.items():
        layer = model.get_submodule(key[len("base_model.model."):-len(MAGNITUDE) - 1])
        expected_shape = (layer.weight.shape[0],) if layer.weight.dim() == 2 else (1, layer.weight.shape[0], 1, 1)
        assert tuple(value.shape) == expected_shape, key
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert close(run(loaded, inputs), expected)
    assert not close(run(base, inputs), expected)


@pytest.mark.parametrize("family", list(CASES))
def test_peft_dora_to_visionpeft_and_back(family, tmp_path):
    _, unfreeze = CASES[family]
    first = CASES[family][0][0]
    base, inputs, expected = peft_dora_directory(family, tmp_path / "peft", rank_pattern={first: 2})
    model = vp.load(copy.deepcopy(base), tmp_path / "peft")
    info = vp.adapters(model)["default"]
    assert info["method"] == "dora" and info["options"]["rank"] == 4
    assert close(run(model, inputs), expected)
    vp.save(model, tmp_path / "again", format="peft")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["use_dora"] is True and again["rank_pattern"]
    assert close(run(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval(), inputs), expected)


def test_a_magnitude_that_does_not_fit_is_refused_and_changes_nothing(tmp_path):
    base, inputs, _ = peft_dora_directory("timm_resnet", tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if k.endswith("layer1.0.conv1." + MAGNITUDE))
    good = tensors[key]
    for bad in (good.reshape(-1), torch.ones(1, good.shape[1] + 1, 1, 1)):
        save_file({**tensors, key: bad}, weights)
        model = copy.deepcopy(base)
        state = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError) as err:
            vp.load(model, tmp_path)
        message = str(err.value)
        assert "layer1.0.conv1" in message and str(tuple(bad.shape)) in message and str(tuple(good.shape)) in message
        assert not vp.adapters(model) and not hasattr(model.layer1[0].conv1, "vp_adapters")
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_lora_directory_still_loads_as_lora(tmp_path):
    base, inputs = build("timm_vit")
    base.eval()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["qkv"]))
    reference.save_pretrained(tmp_path)
    assert vp.adapters(vp.load(copy.deepcopy(base), tmp_path))["default"]["method"] == "lora"
