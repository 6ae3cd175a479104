"""Family presets (targets=None) on tiny models built from configs, with every method end to end."""
import copy
import re

import pytest
import torch

import visionpeft as vp
from conftest import max_rel, perturb
from visionpeft.models import build

EXPECTED = {
    "timm_vit": {"blocks.N.attn.qkv", "blocks.N.attn.proj", "blocks.N.mlp.fc1", "blocks.N.mlp.fc2"},
    "timm_convnext": {"stages.N.blocks.N.conv_dw", "stages.N.blocks.N.mlp.fc1", "stages.N.blocks.N.mlp.fc2", "stages.N.downsample.N"},
    "timm_resnet": {f"layer{i}.N.conv{j}" for i in range(1, 5) for j in (1, 2)} | {f"layer{i}.N.downsample.N" for i in (2, 3, 4)},
    "open_clip": {f"{tower}transformer.resblocks.N.{leaf}" for tower in ("", "visual.") for leaf in ("attn", "mlp.c_fc", "mlp.c_proj")},
    "transformers_clip": {f"{tower}_model.encoder.layers.N.{leaf}" for tower in ("text", "vision")
                          for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")},
    "llama": {f"model.layers.N.{leaf}" for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
    "gpt2": {f"transformer.h.N.{leaf}" for leaf in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
}
UNET_LEAVES = {"to_q", "to_k", "to_v", "to_out.N", "ff.net.N.proj", "ff.net.N", "proj_in", "proj_out", "conv1", "conv2",
               "conv_shortcut", "time_emb_proj", "downsamplers.N.conv", "upsamplers.N.conv"}


def run(model, inputs):
    """Every floating tensor the model returns, flattened into one vector (both CLIP towers count)."""
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    found = []

    def collect(value):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.dim() > 0:
                found.append(value.flatten())
        elif isinstance(value, dict) or hasattr(value, "to_tuple"):
            for item in value.values():
                collect(item)
        elif isinstance(value, (tuple, list)):
            for item in value:
                collect(item)

    collect(out)
    return torch.cat(found)


def adapted_names(model):
    return {re.sub(r"\.\d+(?=\.|$)", ".N", n) for n, m in model.named_modules() if hasattr(m, "vp_adapters")}


@pytest.mark.parametrize("method", ["lora", "flora", "svd", "snella", "sara", "dora", "map", "mora", "nola", "alpha-lora"])
@pytest.mark.parametrize("family", list(EXPECTED) + ["diffusers_unet"])
def test_preset_targets_blocks_only_and_methods_are_exact(family, method, tmp_path):
    base, inputs = build(family)
    base.eval()
    y0 = run(base, inputs)
    model = vp.attach(copy.deepcopy(base), method, **({} if method in ("svd", "sara") else {"rank": 2}))
    names = adapted_names(model)
    if family == "diffusers_unet":
        assert all(re.match(r"(down_blocks|mid_block|up_blocks)\.", n) for n in names)
        assert {n.split(".transformer_blocks.N.")[-1].split("attn1.")[-1].split("attn2.")[-1].split("resnets.N.")[-1]
                .split("attentions.N.")[-1].split("down_blocks.N.")[-1].split("up_blocks.N.")[-1] for n in names} == UNET_LEAVES
    else:
        assert names == EXPECTED[family]
    assert not any(re.search(r"(head|embed|norm|ln_|lm_head|wte|wpe)", n) for n in names)
    assert torch.equal(run(model, inputs), y0), "attach must not change the output (bit-exact)"
    trainable = vp.trainable_parameters(model)
    assert trainable and all(".vp_adapters." in n for n in trainable)
    # NOLA's factors sum 1024 coefficients over unit-sized bases: 0.3 each would make ΔW ~1000x W
    perturb(model, std=0.01 if method == "nola" else 0.3)
    y1 = run(model, inputs)
    assert max_rel(y1, y0) > 1e-4
    run(model, inputs).float().pow(2).mean().backward()
    assert all(p.grad is not None for p in trainable.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    vp.merge(model)
    assert max_rel(run(model, inputs), y1) < 1e-4
    vp.unmerge(model)
    vp.save(model, tmp_path)
    loaded = vp.load(copy.deepcopy(base), tmp_path)
    assert torch.equal(run(loaded, inputs), y1)
    vp.detach(model, merge=False)
    assert max_rel(run(model, inputs), y0) < 1e-5
    assert set(model.state_dict()) == set(base.state_dict())


def test_gpt2_fused_c_attn_is_seen_as_three_blocks():
    model, _ = build("gpt2")
    attn = model.transformer.h[0].attn.c_attn
    from visionpeft.layers.kinds import kind_of

    slot = kind_of(attn).slot(attn, "weight", "transformer.h.0.attn.c_attn")
    assert slot.shape == (96, 32) and slot.blocks == (32, 32, 32)
