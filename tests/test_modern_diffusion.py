"""SDXL, SD3 and FLUX: tiny pipelines from configs, their conditioning and objectives in training, DreamBooth end to
end (train, save, reload, export, diffusers' loader), and the errors for what a pipeline does not support."""
import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import visionpeft as vp
from visionpeft import cli
from visionpeft.core import records
from visionpeft.interop import export_lora, import_lora
from visionpeft.models.pipeline_kinds import denoiser, text_encoders
from visionpeft.models.pipelines import apply_adapter, load_pipeline
from visionpeft.models.tiny_pipelines import TINY_PIPELINES
from visionpeft.training import dreambooth
from visionpeft.training.conditioning import conditioning_for
from visionpeft.training.flow_matching import FlowMatching
from visionpeft.training.objectives import min_snr_weights

pytest.importorskip("peft")
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "dreambooth"
KINDS = ("sdxl", "sd3", "flux")
DENOISER_TARGETS = {"sdxl": ["to_q", "to_k", "to_v", "to_out.0"],
                    "sd3": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                            "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"],
                    "flux": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                             "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                             "ff_context.net.0.proj", "ff_context.net.2"]}


@pytest.fixture(scope="module")
def pipelines():
    built = {kind: TINY_PIPELINES[kind]() for kind in KINDS}
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built


@pytest.fixture(scope="module")
def folders(pipelines, tmp_path_factory):
    saved = {}
    for kind, pipe in pipelines.items():
        saved[kind] = tmp_path_factory.mktemp(kind)
        pipe.save_pretrained(saved[kind])
    return saved


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@torch.no_grad()
def outputs(pipe):
    """(prompt states, denoiser output) for fixed inputs, through the training conditioning: what an adapter on any
    text encoder or on the denoiser changes."""
    conditioning = conditioning_for(pipe)
    cond = conditioning.encode(["a photo of sks dog", "a dog"], text_encoders(pipe), "cpu")
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    batch = {"original_size": torch.tensor([[40, 48], [32, 32]]), "crop_top_left": torch.tensor([[0, 8], [0, 0]])}
    out = conditioning.predict(denoiser(pipe), latents, torch.tensor([50, 700]), cond, batch)
    return cond["prompt_embeds"], out


def perturbed(pipe, kind, with_text=True):
    pipe = copy.deepcopy(pipe)
    vp.attach(denoiser(pipe), "lora", targets=DENOISER_TARGETS[kind], rank=3, alpha=5)
    if with_text:
        vp.attach(pipe.text_encoder, "lora", rank=2, alpha=3)
        if kind == "sdxl":
            vp.attach(pipe.text_encoder_2, "lora", rank=2, alpha=3)
    with torch.no_grad():
        for model in (m for m in (denoiser(pipe), pipe.text_encoder, pipe.text_encoder_2) if records(m)):
            for p in vp.trainable_parameters(model).values():
                p.add_(torch.randn_like(p) * 0.2)
    return pipe


def assert_close(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=5e-5)


def assert_differs(got, want):
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) > 1e-3


# --- the pipelines ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_tiny_pipelines_save_load_and_encode_as_the_pipeline_does(pipelines, folders, kind):
    pipe = load_pipeline(str(folders[kind]))
    assert type(pipe) is type(pipelines[kind])
    assert_close(outputs(pipe), outputs(pipelines[kind]))
    prompts = ["a photo of sks dog", "a dog"]
    conditioning = conditioning_for(pipe, max_sequence_length=32)
    ours = conditioning.encode(prompts, text_encoders(pipe), "cpu")
    if kind == "sdxl":
        theirs = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        want = {"prompt_embeds": theirs[0], "pooled_prompt_embeds": theirs[2]}
    elif kind == "sd3":
        theirs = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False,
                                    max_sequence_length=32)
        want = {"prompt_embeds": theirs[0], "pooled_prompt_embeds": theirs[2]}
    else:
        theirs = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=32)
        want = {"prompt_embeds": theirs[0], "pooled_prompt_embeds": theirs[1]}
    assert ours.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(ours[name], want[name])


def test_sd3_without_its_t5_is_the_documented_reduced_set():
    reduced = TINY_PIPELINES["sd3"](with_t5=False)
    assert reduced.text_encoder_3 is None and list(text_encoders(reduced)) == ["text_encoder", "text_encoder_2"]
    states, _ = outputs(reduced)
    clip_tokens = reduced.tokenizer.model_max_length
    assert states.shape[1] == 2 * clip_tokens and states[:, clip_tokens:].abs().sum() == 0  # zeros for the T5


# --- objectives ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"])
def test_flow_matching_interpolates_and_weights_as_diffusers_defines(pipelines, scheme):
    flow = FlowMatching(pipelines["sd3"].scheduler.config, weighting_scheme=scheme)
    latents = torch.randn(64, 4, 2, 2)
    noised = flow.noised(latents, torch.Generator().manual_seed(0))
    sigma = flow.scheduler.sigmas[[list(flow.scheduler.timesteps).index(t) for t in noised.timesteps]]
    noise = noised.target + latents
    torch.testing.assert_close(noised.noisy, (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise)
    expected = {"sigma_sqrt": sigma ** -2.0, "cosmap": 2 / (torch.pi * (1 - 2 * sigma + 2 * sigma ** 2))}.get(scheme)
    if expected is None:
        assert noised.weights is None
    else:
        torch.testing.assert_close(noised.weights, expected.float())
    assert ((sigma > 0) & (sigma <= 1)).all()


def test_min_snr_weights_for_epsilon_and_v(pipelines):
    from diffusers import DDPMScheduler

    t = torch.tensor([10, 500, 990])
    for prediction, divisor in (("epsilon", 0), ("v_prediction", 1)):
        scheduler = DDPMScheduler.from_config(pipelines["sdxl"].scheduler.config, prediction_type=prediction)
        alpha_bar = scheduler.alphas_cumprod[t]
        snr = alpha_bar / (1 - alpha_bar)
        torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0), torch.clamp(snr, max=5.0) / (snr + divisor))


# --- DreamBooth end to end ----------------------------------------------------------------------
def recipe_for(kind, folder, instance_dir, output, **changes):
    recipe = {
        "task": "dreambooth", "model": {"pretrained": str(folder)},
        "adapter": {"method": "lora", "options": {"rank": 2}, "targets": DENOISER_TARGETS[kind]},
        "text_encoder": {"method": "lora", "options": {"rank": 2}},
        "data": {"instance_dir": str(instance_dir), "instance_prompt": "a photo of sks dog", "resolution": 32,
                 "max_sequence_length": 16},
        "prior": {"class_prompt": "a photo of dog", "num_class_images": 1, "sample_steps": 1, "sample_batch_size": 1},
        "train": {"steps": 3, "batch_size": 1, "lr": 1e-2},
        "validation": {"prompts": ["a sks dog"], "interval": 3, "images_per_prompt": 1, "steps": 1},
        "output": str(output)}
    for section, values in changes.items():
        recipe[section] = values if not isinstance(values, dict) else {**recipe.get(section, {}), **values}
    return recipe


EXTRA = {"sdxl": {"train": {"snr_gamma": 5.0, "noise_offset": 0.05}, "data": {"cache_latents": True}},
         "sd3": {"train": {"weighting_scheme": "logit_normal"}},
         "flux": {"train": {"weighting_scheme": "cosmap", "guidance_scale": 3.5}, "data": {"cache_latents": True}}}


@pytest.mark.parametrize("kind", KINDS)
def test_dreambooth_trains_saves_reloads_and_exports(pipelines, folders, instance_dir, tmp_path, kind):
    recipe = recipe_for(kind, folders[kind], instance_dir, tmp_path / "run", **EXTRA[kind])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert cli.main(["train", str(tmp_path / "recipe.yaml"), "--quiet"]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["pipeline"] == type(pipelines[kind]).__name__ and summary["prior_preservation"]
    assert summary["objective"] == ("diffusion" if kind == "sdxl" else "flow_matching")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 3 and all(np.isfinite(losses)) and len(set(losses)) > 1
    assert all(r["prior_loss"] for r in rows)
    assert (run / "validation" / "step_000003.png").is_file()
    expected_text = ["text_encoder", "text_encoder_2"] if kind in ("sdxl", "sd3") else ["text_encoder"]
    assert summary["text_encoders"] == expected_text
    assert all((run / "adapter" / name / "adapter.json").is_file() for name in expected_text)

    trained = apply_adapter(load_pipeline(str(folders[kind])), run / "adapter")
    assert_differs(outputs(trained), outputs(pipelines[kind]))
    path = export_lora(tmp_path / "lora.safetensors", trained)
    loaded = copy.deepcopy(pipelines[kind])
    loaded.load_lora_weights(str(path))
    assert_close(outputs(loaded), outputs(trained))


def test_latent_and_text_caches_are_reused_and_refused_for_another_prompt(folders, instance_dir, tmp_path):
    cache = str(tmp_path / "cache")
    base = recipe_for("sd3", folders["sd3"], instance_dir, tmp_path / "a",
                      data={"cache_latents": True, "cache_text_embeddings": True, "cache_dir": cache},
                      prior={"class_dir": str(tmp_path / "class")},
                      train={"steps": 1}, validation={"prompts": []})
    base["text_encoder"] = {"method": None}
    dreambooth.train(dreambooth.validate(base), progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    assert {"latents.safetensors", "text_embeddings.safetensors"} <= set(stamps)
    dreambooth.train(dreambooth.validate(base | {"output": str(tmp_path / "b")}), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == stamps
    other = copy.deepcopy(base) | {"output": str(tmp_path / "c")}
    other["data"] = base["data"] | {"instance_prompt": "a photo of zwx cat", "cache_latents": False}
    with pytest.raises(ValueError, match="built for prompts"):
        dreambooth.train(dreambooth.validate(other), progress=False)


# --- files the pipelines load -------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_exported_file_loads_in_the_pipeline_and_the_bare_component(pipelines, tmp_path, kind):
    adapted = perturbed(pipelines[kind], kind)
    expected = outputs(adapted)
    assert_differs(expected, outputs(pipelines[kind]))
    path = export_lora(tmp_path / "lora.safetensors", adapted)
    prefix = "unet" if kind == "sdxl" else "transformer"
    keys = set(json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")]))
    assert {k.split(".")[0] for k in keys if k != "__metadata__"} == (
        {prefix, "text_encoder", "text_encoder_2"} if kind == "sdxl" else {prefix, "text_encoder"})

    loaded = copy.deepcopy(pipelines[kind])
    loaded.load_lora_weights(str(path))
    assert_close(outputs(loaded), expected)

    bare = copy.deepcopy(denoiser(pipelines[kind]))
    bare.load_lora_adapter(str(path), prefix=prefix)
    component = copy.deepcopy(pipelines[kind])
    setattr(component, prefix, bare)
    for name in text_encoders(component):
        setattr(component, name, getattr(adapted, name))
    assert_close(outputs(component), expected)

    imported = copy.deepcopy(pipelines[kind])
    attached = import_lora(path, imported)
    assert set(attached) == {k.split(".")[0] for k in keys if k != "__metadata__"}
    assert_close(outputs(imported), expected)


def test_sdxl_kohya_file_loads_in_diffusers_and_imports_back(pipelines, tmp_path):
    from visionpeft.interop import read_lora_file

    adapted = perturbed(pipelines["sdxl"], "sdxl")
    path = export_lora(tmp_path / "kohya.safetensors", adapted, fmt="kohya")
    prefixes = {k.split("_")[1] for k in read_lora_file(path)[0]}
    assert prefixes == {"unet", "te1", "te2"}
    loaded = copy.deepcopy(pipelines["sdxl"])
    loaded.load_lora_weights(str(path))
    assert_close(outputs(loaded), outputs(adapted))
    imported = copy.deepcopy(pipelines["sdxl"])
    import_lora(path, imported)
    assert records(imported.text_encoder_2)["default"].options["rank"] == 2
    assert_close(outputs(imported), outputs(adapted))


def test_exports_refuse_what_the_pipeline_loader_cannot_read(pipelines, tmp_path):
    flux = perturbed(pipelines["flux"], "flux", with_text=False)
    with pytest.raises(ValueError, match="fmt='kohya' is not available for a FluxPipeline"):
        export_lora(tmp_path / "k.safetensors", flux, fmt="kohya")
    vp.attach(flux.text_encoder_2, "lora", targets=["q", "v"], rank=2)  # the T5
    with pytest.raises(ValueError, match="text_encoder_2 carries adapter 'default'.*reads only transformer, text_encoder"):
        export_lora(tmp_path / "t5.safetensors", flux)
    assert not list(tmp_path.iterdir())


# --- bad input ----------------------------------------------------------------------------------
def test_objective_options_that_do_not_fit_the_pipeline_are_refused_before_training(folders, instance_dir, tmp_path):
    cases = [("sdxl", {"weighting_scheme": "logit_normal"}, r"train.weighting_scheme='logit_normal' does not apply to an "
                                                            r"ε/v model \(StableDiffusionXLPipeline\).*train.snr_gamma"),
             ("flux", {"snr_gamma": 5.0}, r"train.snr_gamma=5.0 does not apply to a flow-matching model "
                                           r"\(FluxPipeline\).*train.weighting_scheme"),
             ("sd3", {"guidance_scale": 3.5}, r"train.guidance_scale=3.5 does not apply"),
             ("sd3", {"noise_offset": 0.1}, r"train.noise_offset=0.1")]
    for kind, train, message in cases:
        recipe = recipe_for(kind, folders[kind], instance_dir, tmp_path / kind, train=train)
        with pytest.raises(ValueError, match=message):
            dreambooth.train(dreambooth.validate(recipe), progress=False)
        assert not list((tmp_path / kind).rglob("*.png"))
    bad = recipe_for("sd3", folders["sd3"], instance_dir, tmp_path / "x", train={"weighting_scheme": "uniform"})
    with pytest.raises(ValueError, match="weighting_scheme='uniform' is unknown; allowed: logit_normal, mode, "
                                         "sigma_sqrt, cosmap, none"):
        dreambooth.validate(bad)
    missing = recipe_for("flux", folders["flux"], instance_dir, tmp_path / "y",
                         text_encoder={"components": ["text_encoder_3"]})
    with pytest.raises(ValueError, match="has no 'text_encoder_3'; its text encoders: text_encoder, text_encoder_2"):
        dreambooth.train(dreambooth.validate(missing), progress=False)
    with pytest.raises(ValueError, match="cache_text_embeddings=true with text_encoder.method='lora'"):
        dreambooth.validate(recipe_for("flux", folders["flux"], instance_dir, tmp_path / "z",
                                       data={"cache_text_embeddings": True}))


def test_an_unsupported_pipeline_class_is_refused_with_the_supported_ones(folders, tmp_path):
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(folders["flux"], odd)
    index = json.loads((odd / "model_index.json").read_text())
    (odd / "model_index.json").write_text(json.dumps(index | {"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="'KandinskyPipeline' is not supported; supported: StableDiffusionPipeline, "
                                         "StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline"):
        load_pipeline(str(odd))


@pytest.mark.parametrize("kind", KINDS)
def test_generate_writes_images_and_a_grid(folders, tmp_path, kind, capsys):
    out = tmp_path / "out"
    args = ["generate", "--pipeline", str(folders[kind]), "--prompt", "a sks dog", "a dog", "--num-images", "2",
            "--steps", "2", "--size", "32", "--guidance-scale", "3.5", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    assert sorted(p.name for p in out.glob("prompt*.png")) == [f"prompt0{p}_0{i}.png" for p in (0, 1) for i in (0, 1)]
    assert Image.open(out / "grid.png").size == (64, 64)
    if kind != "sdxl":
        assert cli.main(args + ["--sampler", "dpmsolver"]) == 2
        assert "sampler 'dpmsolver' is for ε/v pipelines" in capsys.readouterr().err


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_recipes_validate_and_their_targets_select_layers_of_the_pipeline(pipelines, kind):
    from visionpeft.targeting import resolve_targets

    for method in ("lora", "flora", "sara"):
        recipe = dreambooth.load_recipe(RECIPES / f"{kind}_{method}.yaml")
        assert recipe["adapter"]["method"] == method and recipe["data"]["cache_latents"]
        targets = recipe["adapter"]["targets"]  # None: the family default
        layers = resolve_targets(denoiser(pipelines[kind]), targets)
        assert layers and (targets is None or all(t.name.endswith(tuple(targets)) for t in layers))
        objectives_given = {k for k in ("snr_gamma", "weighting_scheme", "guidance_scale") if recipe["train"][k]}
        assert objectives_given == {"sdxl": {"snr_gamma"}, "sd3": {"weighting_scheme"},
                                    "flux": {"weighting_scheme", "guidance_scale"}}[kind]


def test_import_of_diffusers_flux_dreambooth_output_keeps_its_alpha(pipelines, tmp_path):
    """What ``train_dreambooth_lora_flux.py`` saves: PEFT LoRA on the transformer, ``transformer.`` keys and the
    adapter config as metadata (alpha = 2 × rank here, so the scale is 2)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    peer = copy.deepcopy(pipelines["flux"])
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=DENOISER_TARGETS["flux"])
    peer.transformer.add_adapter(config)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(peer.transformer),
                                   transformer_lora_adapter_metadata=config.to_dict())
    ours = copy.deepcopy(pipelines["flux"])
    assert import_lora(tmp_path / "pytorch_lora_weights.safetensors", ours) == {"transformer": ["default"]}
    layer = dict(ours.transformer.named_modules())["transformer_blocks.0.attn.to_q"]
    assert layer.vp_adapters["default"]["weight"].scale == pytest.approx(2.0)
    assert_differs(outputs(ours), outputs(pipelines["flux"]))
    assert_close(outputs(ours), outputs(peer))
