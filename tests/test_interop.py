"""LoRA files of the diffusers ecosystem: export checked by diffusers' own loader, import of diffusers (PEFT) and
kohya files, merged checkpoints and LoRA approximations of other methods."""
import copy

import pytest
import torch

import visionpeft as vp
from visionpeft.core import records
from visionpeft.interop import export_lora, export_lora_approximation, import_lora, read_lora_file, save_merged
from visionpeft.interop.diffusers_lora import write_lora_file
from visionpeft.models.pipelines import load_pipeline, tiny_stable_diffusion

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base_pipeline():
    pipeline = tiny_stable_diffusion()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def pipeline(base_pipeline):
    return copy.deepcopy(base_pipeline)


@torch.no_grad()
def outputs(pipeline):
    """(text states, UNet output) for a fixed batch: what an adapter on either model changes."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, len(pipeline.tokenizer), (2, pipeline.tokenizer.model_max_length), generator=g)
    states = pipeline.text_encoder(ids)[0]
    sample = torch.randn(2, 4, 16, 16, generator=g)
    return states, pipeline.unet(sample, torch.tensor([3, 700]), states).sample


def perturbed_lora(pipeline, text_encoder=True):
    """LoRA with a scale that is not a power of two (alpha/rank = 5/3) on every preset layer, convs included."""
    vp.attach(pipeline.unet, "lora", rank=3, alpha=5)
    if text_encoder:
        vp.attach(pipeline.text_encoder, "lora", rank=2, alpha=3)
    with torch.no_grad():
        for model in (pipeline.unet, pipeline.text_encoder) if text_encoder else (pipeline.unet,):
            for p in vp.trainable_parameters(model).values():
                p.add_(torch.randn_like(p) * 0.2)
    return pipeline


def assert_close(got, want):
    # outputs are O(1); merged weights and an adapter's own path differ by float32 round-off accumulated over
    # ~30 strongly perturbed layers (up to 1.6e-5 seen), far below the 1e-3 that ``assert_differs`` demands
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=5e-5)


def assert_differs(got, want):
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) > 1e-3


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_lora_export_loads_in_diffusers_with_the_same_outputs(base_pipeline, pipeline, tmp_path, fmt):
    adapted = perturbed_lora(pipeline)
    expected = outputs(adapted)
    assert_differs(expected, outputs(base_pipeline))
    assert any(layer.endswith("conv1") for layer in records(adapted.unet)["default"].layers)  # conv LoRA is covered
    path = export_lora(tmp_path / "lora.safetensors", adapted.unet, adapted.text_encoder, fmt=fmt)

    loaded = copy.deepcopy(base_pipeline)
    loaded.load_lora_weights(str(path))
    assert_close(outputs(loaded), expected)

    imported = copy.deepcopy(base_pipeline)
    assert import_lora(path, imported.unet, imported.text_encoder) == {"unet": ["default"], "text_encoder": ["default"]}
    assert records(imported.unet)["default"].method == "lora"
    assert records(imported.unet)["default"].options["rank"] == 3
    assert_close(outputs(imported), expected)


def test_merged_adapter_equals_the_diffusers_loaded_export(base_pipeline, pipeline, tmp_path):
    adapted = perturbed_lora(pipeline, text_encoder=False)
    path = export_lora(tmp_path / "unet_lora.safetensors", adapted.unet)
    vp.merge(adapted.unet)
    loaded = copy.deepcopy(base_pipeline)
    loaded.load_lora_weights(str(path))
    assert_close(outputs(loaded), outputs(adapted))


def test_import_of_a_peft_lora_saved_by_diffusers_keeps_its_alpha(base_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    peer = copy.deepcopy(base_pipeline)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    peer.unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(peer.unet),
                                              unet_lora_adapter_metadata=config.to_dict())
    file = tmp_path / "pytorch_lora_weights.safetensors"
    assert all(k.startswith("unet.") for k in read_lora_file(file)[0])

    ours = copy.deepcopy(base_pipeline)
    import_lora(file, ours.unet)
    layer = dict(ours.unet.named_modules())["down_blocks.0.resnets.0.conv1"]
    assert layer.vp_adapters["default"]["weight"].scale == pytest.approx(2.0)
    assert_close(outputs(ours), outputs(peer))


def test_kohya_file_with_alpha_imports_like_diffusers_loads_it(base_pipeline, tmp_path):
    torch.manual_seed(3)
    state = {}
    for name, module in base_pipeline.unet.named_modules():
        if name.endswith(("attn2.to_k", "resnets.0.conv2")):
            kernel = module.weight.shape[2:]
            stem = "lora_unet_" + name.replace(".", "_")
            state[f"{stem}.lora_down.weight"] = torch.randn(2, module.weight.shape[1], *kernel) * 0.3
            state[f"{stem}.lora_up.weight"] = torch.randn(module.weight.shape[0], 2, *(1,) * len(kernel)) * 0.3
            state[f"{stem}.alpha"] = torch.tensor(1.0)  # scale alpha/rank = 0.5
    file = write_lora_file(tmp_path / "kohya.safetensors", state)
    loaded = copy.deepcopy(base_pipeline)
    loaded.load_lora_weights(str(file))
    ours = copy.deepcopy(base_pipeline)
    import_lora(file, ours.unet)
    assert_differs(outputs(ours), outputs(base_pipeline))
    assert_close(outputs(ours), outputs(loaded))


def test_kohya_alpha_zero_means_alpha_equal_to_rank(base_pipeline):
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    stem = "lora_unet_" + module.replace(".", "_")
    state = {f"{stem}.lora_down.weight": torch.randn(2, 16), f"{stem}.lora_up.weight": torch.randn(16, 2)}
    zero, missing = copy.deepcopy(base_pipeline), copy.deepcopy(base_pipeline)
    import_lora(state | {f"{stem}.alpha": torch.tensor(0.0)}, zero.unet)
    import_lora(state, missing.unet)
    assert dict(zero.unet.named_modules())[module].vp_adapters["default"]["weight"].factors()[2] == 1.0
    assert_differs(outputs(zero), outputs(base_pipeline))
    assert_close(outputs(zero), outputs(missing))


def test_lora_export_refuses_what_a_lora_file_cannot_hold(pipeline, tmp_path):
    vp.attach(pipeline.unet, "lora", targets=["to_q"], unfreeze=["conv_in"])
    with pytest.raises(ValueError, match=r"\['conv_in'\].*save_merged.*export_lora_approximation"):
        export_lora(tmp_path / "lora.safetensors", pipeline.unet)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, dilation=2),
                              torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), torch.nn.Conv2d(4, 4, 3, padding=1))
    vp.attach(net, "lora", targets=["0", "1", "2"], rank=2)
    with pytest.raises(ValueError, match=r"0:weight .*dilation=\(2, 2\).*1:weight .*padding_mode='reflect'"):
        export_lora(tmp_path / "lora.safetensors", net)
    assert not (tmp_path / "lora.safetensors").exists()


def test_import_refuses_bad_files_and_leaves_the_model_untouched(base_pipeline, pipeline, tmp_path):
    unet = pipeline.unet
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    good_down = torch.zeros(2, 16)
    with pytest.raises(ValueError, match="no module 'nope.to_q'"):
        import_lora({"unet.nope.to_q.lora_A.weight": good_down, "unet.nope.to_q.lora_B.weight": torch.zeros(16, 2)}, unet)
    with pytest.raises(ValueError, match="do not fit its weight"):
        import_lora({f"unet.{module}.lora_A.weight": torch.zeros(2, 7),
                     f"unet.{module}.lora_B.weight": torch.zeros(16, 2)}, unet)
    with pytest.raises(ValueError, match="no up"):
        import_lora({f"unet.{module}.lora_A.weight": good_down}, unet)
    with pytest.raises(ValueError, match="in no format"):
        import_lora({"something.else": good_down}, unet)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        write_lora_file(tmp_path / "lora.bin", {})
    # the first group (scale 0.5) is fine, the second (alpha -1) is not: nothing may stay attached
    other = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    mixed = {f"lora_unet_{m.replace('.', '_')}.{part}": value for m, alpha in ((module, 1.0), (other, -1.0))
             for part, value in (("lora_down.weight", torch.ones(2, 16)), ("lora_up.weight", torch.ones(16, 2)),
                                 ("alpha", torch.tensor(alpha)))}
    with pytest.raises(ValueError, match=r"adapter 'default_1'.*alpha"):
        import_lora(mixed, unet)
    assert not records(unet)
    torch.testing.assert_close(outputs(pipeline), outputs(base_pipeline), rtol=0, atol=0)


def test_other_methods_export_merged_and_as_a_lora_approximation(base_pipeline, pipeline, tmp_path):
    vp.attach(pipeline.unet, "flora", rank=2, spatial_rank=1)
    with torch.no_grad():
        for p in vp.trainable_parameters(pipeline.unet).values():
            p.add_(torch.randn_like(p) * 0.3)
    expected = outputs(pipeline)
    assert_differs(expected, outputs(base_pipeline))
    with pytest.raises(ValueError, match="export_lora_approximation"):
        export_lora(tmp_path / "x.safetensors", pipeline.unet)

    save_merged(pipeline, tmp_path / "merged")
    assert_close(outputs(load_pipeline(str(tmp_path / "merged"))), expected)
    assert records(pipeline.unet)  # the original keeps its adapter

    errors = export_lora_approximation(tmp_path / "full_rank.safetensors", pipeline.unet, rank=512)
    assert errors and max(errors.values()) < 1e-5
    loaded = copy.deepcopy(base_pipeline)
    loaded.load_lora_weights(str(tmp_path / "full_rank.safetensors"))
    assert_close(outputs(loaded), expected)
    coarse = export_lora_approximation(tmp_path / "rank1.safetensors", pipeline.unet, rank=1)
    assert max(coarse.values()) > 1e-3


def test_lora_approximation_checks_its_arguments_before_copying(pipeline, tmp_path, monkeypatch):
    from visionpeft.interop import merged

    vp.attach(pipeline.unet, "svd")

    def no_copies(model):
        raise AssertionError("the model was copied before the arguments were checked")

    monkeypatch.setattr(merged, "base_copy", no_copies)
    monkeypatch.setattr(merged, "merged_copy", no_copies)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_lora_approximation(tmp_path / "lora.bin", pipeline.unet)
    with pytest.raises(ValueError, match="fmt='comfy'"):
        export_lora_approximation(tmp_path / "lora.safetensors", pipeline.unet, fmt="comfy")
    with pytest.raises(ValueError, match="rank=0"):
        export_lora_approximation(tmp_path / "lora.safetensors", pipeline.unet, rank=0)


def perturbed_dora(pipeline):
    """DoRA (scale 5/3) on every preset UNet layer, convs included, and on the text encoder; magnitudes moved too."""
    vp.attach(pipeline.unet, "dora", rank=3, alpha=5)
    vp.attach(pipeline.text_encoder, "dora", rank=2, alpha=3)
    with torch.no_grad():
        for model in (pipeline.unet, pipeline.text_encoder):
            for p in vp.trainable_parameters(model).values():
                p.add_(torch.randn_like(p) * 0.05 * (p.abs().mean() if p.dim() == 1 else 4))
    return pipeline


def test_dora_export_loads_in_diffusers_and_imports_back(base_pipeline, pipeline, tmp_path):
    adapted = perturbed_dora(pipeline)
    expected = outputs(adapted)
    assert_differs(expected, outputs(base_pipeline))
    path = export_lora(tmp_path / "dora.safetensors", adapted.unet, adapted.text_encoder)
    state, _ = read_lora_file(path)
    magnitudes = {k: v.shape for k, v in state.items() if k.endswith("lora_magnitude_vector.weight")}
    assert any(len(shape) == 4 for shape in magnitudes.values()) and any(len(shape) == 1 for shape in magnitudes.values())

    loaded = copy.deepcopy(base_pipeline)
    loaded.load_lora_weights(str(path))
    assert_close(outputs(loaded), expected)

    imported = copy.deepcopy(base_pipeline)
    assert import_lora(path, imported.unet, imported.text_encoder) == {"unet": ["default"], "text_encoder": ["default"]}
    assert records(imported.unet)["default"].method == "dora"
    assert_close(outputs(imported), expected)


def test_dora_kohya_file_carries_dora_scale_and_imports_back(base_pipeline, pipeline, tmp_path):
    adapted = perturbed_dora(pipeline)
    expected = outputs(adapted)
    path = export_lora(tmp_path / "dora.safetensors", adapted.unet, adapted.text_encoder, fmt="kohya")
    state, _ = read_lora_file(path)
    scales = [k for k in state if k.endswith(".dora_scale")]
    assert scales and all(state[k].shape[0] == state[k.replace("dora_scale", "lora_up.weight")].shape[0]
                          and state[k].shape[1:].numel() == 1 for k in scales)
    imported = copy.deepcopy(base_pipeline)
    import_lora(path, imported.unet, imported.text_encoder)
    assert records(imported.text_encoder)["default"].method == "dora"
    assert_close(outputs(imported), expected)


def test_dora_magnitude_that_does_not_fit_is_refused_untouched(base_pipeline, pipeline, tmp_path):
    adapted = perturbed_dora(pipeline)
    path = export_lora(tmp_path / "dora.safetensors", adapted.unet)
    state, _ = read_lora_file(path)
    key = next(k for k in state if k.endswith("lora_magnitude_vector.weight"))
    state[key] = torch.ones(state[key].numel() + 1)
    fresh = copy.deepcopy(base_pipeline)
    with pytest.raises(ValueError, match="DoRA magnitude of shape"):
        import_lora(state, fresh.unet)
    assert not records(fresh.unet)


def test_map_is_refused_by_the_lora_export(pipeline, tmp_path):
    vp.attach(pipeline.unet, "map", rank=2)
    with pytest.raises(ValueError, match="'map'; only 'lora' and 'dora' export"):
        export_lora(tmp_path / "map.safetensors", pipeline.unet)
    assert not (tmp_path / "map.safetensors").exists()
