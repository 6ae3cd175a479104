"""PEFT adapter directories both ways, judged by the installed peft: vp.save(format="peft") loads in
PeftModel.from_pretrained with the same output; vp.load reads a PeftModel.save_pretrained directory with PeftModel's
output."""
import copy
import json

import pytest
import torch
from torch import nn

import visionpeft as vp
from conftest import perturb
from visionpeft.models import build

peft = pytest.importorskip("peft")


def run(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    for attr in ("logits", "sample"):
        out = getattr(out, attr, out)
    return out


def perturb_peft(model, std=0.1):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * std)
    return model


def close(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


# family, targets for visionpeft (None: the preset), PEFT target_modules, modules to unfreeze / save
CASES = {
    "timm_vit": (None, ["qkv", "proj", "fc1", "fc2"], ["head"]),
    "llama": (None, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ["lm_head"]),
    "diffusers_unet": (None, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in"], ["conv_out"]),
    "timm_resnet": (None, ["conv1", "conv2"], ["fc"]),  # conv LoRA: PEFT's kxk down and 1x1 up
}


@pytest.mark.parametrize("family", list(CASES))
def test_visionpeft_to_peft(family, tmp_path):
    targets, _, unfreeze = CASES[family]
    base, inputs = build(family)
    base.eval()
    model = copy.deepcopy(base)
    vp.attach(model, "lora", targets=targets, unfreeze=unfreeze, rank=4, alpha=6, rslora=(family == "llama"))
    perturb(model)
    with torch.no_grad():
        for param in dict(model.named_modules())[unfreeze[0]].parameters():
            param.mul_(1.5)
    expected = run(model, inputs)
    vp.save(model, tmp_path, format="peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert close(run(loaded, inputs), expected)
    assert not close(run(base, inputs), expected)


@pytest.mark.parametrize("family", list(CASES))
def test_peft_to_visionpeft_with_patterns(family, tmp_path):
    _, target_modules, unfreeze = CASES[family]
    base, inputs = build(family)
    base.eval()
    first = target_modules[0]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, modules_to_save=unfreeze,
                             rank_pattern={first: 2}, alpha_pattern={target_modules[1]: 3},
                             use_rslora=(family == "timm_vit"))
    reference = perturb_peft(peft.get_peft_model(copy.deepcopy(base), config)).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "modules_to_save" in name:
                param.mul_(1.5)
    reference.save_pretrained(tmp_path)
    expected = run(reference, inputs)
    model = vp.load(copy.deepcopy(base), tmp_path)
    assert close(run(model, inputs), expected)
    info = vp.adapters(model)["default"]
    assert info["method"] == "lora" and info["options"]["rank"] == 4
    assert set(vp.trainable_parameters(model)) >= {k for k in model.state_dict() if k.startswith(unfreeze[0] + ".")}
    # and back: visionpeft's PEFT directory of the mixed-rank adapter loads in PeftModel with the same output
    vp.save(model, tmp_path / "again", format="peft")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["rank_pattern"] and again["alpha_pattern"]
    assert close(run(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval(), inputs), expected)


def test_the_file_diffusers_training_scripts_save(tmp_path):
    """train_dreambooth_lora.py: unet.add_adapter(LoraConfig), then save_lora_weights of the PEFT state dict."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    base, inputs = build("diffusers_unet")
    base.eval()
    trained = copy.deepcopy(base)
    trained.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                        target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    perturb_peft(trained)
    expected = run(trained, inputs)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(trained)))
    model = copy.deepcopy(base)
    vp.interop.import_lora(tmp_path / "pytorch_lora_weights.safetensors", model)
    assert close(run(model, inputs), expected)
    vp.save(model, tmp_path / "peft", format="peft")
    assert close(run(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval(), inputs), expected)


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)
        self.dilated = nn.Conv1d(8, 8, 3, dilation=2, padding=2)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0])


@pytest.mark.parametrize("kwargs,needle", [
    (dict(method="svd", targets=["fc"]), "'svd', which PEFT's adapter format cannot express"),
    (dict(method="lora", targets=["attn"]), "attn (AdaptedMultiheadAttention: weight slot 'in_proj'"),
    (dict(method="lora", targets=["dilated"]), "dilation=(2,)"),
])
def test_what_peft_cannot_express_is_refused(kwargs, needle, tmp_path):
    model = WithAttention()
    vp.attach(model, kwargs.pop("method"), **kwargs)
    with pytest.raises(ValueError) as err:
        vp.save(model, tmp_path / "a", format="peft")
    assert needle in str(err.value) and "format='visionpeft'" in str(err.value) and "how='svd'" in str(err.value)
    assert not (tmp_path / "a" / "adapter_config.json").exists()


def test_unsupported_peft_directory_is_refused_and_changes_nothing(tmp_path):
    base = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0"]))
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for change, needle in (({"peft_type": "LOHA"}, "peft_type 'LOHA'"), ({"bias": "all"}, "bias='all'")):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **change}))
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match=needle):
            vp.load(model, tmp_path)
        assert not vp.adapters(model) and not hasattr(model[0], "vp_adapters")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="another model"):
        vp.load(nn.Sequential(nn.Identity(), nn.Linear(8, 2)), tmp_path)
    vp.load(model := copy.deepcopy(base), tmp_path, name="mine")
    assert list(vp.adapters(model)) == ["mine"]
