"""DreamBooth fine-tuning on a tiny Stable Diffusion pipeline built from configs (no downloads): the objective,
prior preservation, training steps per method, the recipe runner behind ``visionpeft train``, ``visionpeft
generate`` and adapter round trips."""
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
from visionpeft.models.pipelines import (
    apply_adapter, load_pipeline, save_pipeline_adapter, tiny_stable_diffusion,
)
from visionpeft.training import dreambooth
from visionpeft.core import adapted_layers, records
from visionpeft.training.dreambooth import (
    assemble_batch, diffusion_target, dreambooth_loss, encode_prompts, noisy_sample,
)
from visionpeft.training.dreambooth_data import ensure_class_images

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "dreambooth"
METHODS = {"lora": {"rank": 4}, "flora": {"rank": 4}, "snella": {"rank": 4}, "sara": {"density": 0.05}, "svd": {}}


@pytest.fixture(scope="module")
def pipeline():
    pipe = tiny_stable_diffusion()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipeline_dir(pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@torch.no_grad()
def unet_output(pipe):
    g = torch.Generator().manual_seed(5)
    states = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a photo of sks dog"] * 2, "cpu")
    return pipe.unet(torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 600]), states).sample


# --- the objective ------------------------------------------------------------------------------
def test_prior_preservation_adds_the_weighted_class_loss():
    torch.manual_seed(0)
    prediction, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    instance = ((prediction[:2] - target[:2]) ** 2).mean()
    prior = ((prediction[2:] - target[2:]) ** 2).mean()
    parts = dreambooth_loss(prediction, target, num_instance=2, prior_weight=0.5)
    torch.testing.assert_close(parts.instance, instance)
    torch.testing.assert_close(parts.prior, prior)
    torch.testing.assert_close(parts.total, instance + 0.5 * prior)
    torch.testing.assert_close(dreambooth_loss(prediction, target, 2, 0.0).total, instance)
    alone = dreambooth_loss(prediction, target, num_instance=4, prior_weight=1.0)
    assert alone.prior is None
    torch.testing.assert_close(alone.total, ((prediction - target) ** 2).mean())
    with pytest.raises(ValueError, match="num_instance=0"):
        dreambooth_loss(prediction, target, 0, 1.0)


def test_batch_assembly_puts_class_samples_after_instance_samples_with_their_prompt():
    instance, extra = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    states = torch.stack([torch.full((5, 4), 1.0), torch.full((5, 4), 2.0)])  # instance prompt, class prompt
    pixels, rows, n_instance = assemble_batch({"instance": instance, "class": extra}, states)
    assert n_instance == 2 and torch.equal(pixels, torch.cat([instance, extra]))
    assert rows.shape == (4, 5, 4) and rows[:2].eq(1.0).all() and rows[2:].eq(2.0).all()
    pixels, rows, n_instance = assemble_batch({"instance": instance}, states[:1])
    assert n_instance == 2 and torch.equal(pixels, instance) and rows.shape == (2, 5, 4) and rows.eq(1.0).all()
    with pytest.raises(ValueError, match="1 prompt"):
        assemble_batch({"instance": instance, "class": extra}, states[:1])


def test_weight_decay_spares_parameters_that_start_at_the_pretrained_weights(pipeline):
    """SVD's singular values and SaRA's selected weights start at the base weights: decay would shrink them."""
    from visionpeft.training.recipe import SCHEMA

    cfg = dreambooth.load_recipe(RECIPES / "svd.yaml")["train"]
    assert cfg["no_decay"] == SCHEMA["train"]["no_decay"][1]
    unet, text_encoder = copy.deepcopy(pipeline.unet), copy.deepcopy(pipeline.text_encoder)
    vp.attach(unet, "svd")
    vp.attach(text_encoder, "sara", density=0.05)
    vp.attach(text_encoder, "lora", rank=2, name="lora")
    groups = dreambooth.optimizer_groups([unet, text_encoder], cfg)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    trained = {f"{i}.{n}": p for i, m in enumerate((unet, text_encoder)) for n, p in vp.trainable_parameters(m).items()}
    assert sum(len(g["params"]) for g in groups) == len(trained)
    for suffix in (".s", ".values"):
        chosen = [n for n in trained if n.endswith(suffix)]
        assert chosen and not any(id(trained[n]) in decayed for n in chosen), suffix
    assert any(id(p) in decayed for n, p in trained.items() if n.endswith("lora_A"))
    assert all(g["weight_decay"] == cfg["weight_decay"] for g in groups if g["weight_decay"] > 0)


def test_targets_follow_the_scheduler_prediction_type():
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert diffusion_target(eps, latents, noise, t) is noise
    v = DDPMScheduler(prediction_type="v_prediction")
    alpha_bar = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion_target(v, latents, noise, t),
                               alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents)
    with pytest.raises(ValueError, match="'sample'"):
        diffusion_target(DDPMScheduler(prediction_type="sample"), latents, noise, t)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_few_steps_lower_the_loss(pipeline, method):
    assert method in vp.methods()
    unet = copy.deepcopy(pipeline.unet)
    vp.attach(unet, method, **METHODS[method])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():
        states = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, ["a photo of sks dog", "a photo of dog"], "cpu")
    noisy, noise, timesteps = noisy_sample(pipeline.scheduler, latents, g)
    target = diffusion_target(pipeline.scheduler, latents, noise, timesteps)
    optimizer = torch.optim.AdamW(vp.trainable_parameters(unet).values(), lr=1e-2)
    losses = []
    for step in range(3):
        loss = dreambooth_loss(unet(noisy, timesteps, states).sample, target, 1, 1.0).total
        losses.append(loss.item())
        (loss + vp.regularization(unet)).backward()
        optimizer.step()
        optimizer.zero_grad()
        vp.step(unet, step + 1, 3)
    final = dreambooth_loss(unet(noisy, timesteps, states).sample, target, 1, 1.0).total.item()
    assert final < 0.99 * losses[0], (losses, final)


# --- recipes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_shipped_recipes_validate(method):
    recipe = dreambooth.load_recipe(RECIPES / f"{method}.yaml")
    assert recipe["adapter"]["method"] == method and recipe["task"] == "dreambooth"


def test_recipe_errors_name_the_key(tmp_path):
    raw = yaml.safe_load((RECIPES / "lora.yaml").read_text())
    cases = [({"train": {"steps": 0}}, "train.steps=0"), ({"train": {"precision": "fp8"}}, "'train.precision'"),
             ({"prior": {"colour": 1}}, "prior.colour"), ({"adapter": {"method": "lora", "options": {"rnk": 2}}}, "rnk"),
             ({"data": {"resolution": 30}}, "multiple of 8"), ({"validation": {"sampler": "euler"}}, "dpmsolver"),
             ({"train": {"grad_clip": -1.0}}, r"train.grad_clip=-1.0 must be > 0"),
             ({"train": {"no_decay": ["bias", ""]}}, "train.no_decay"),
             ({"text_encoder": {"method": None, "targets": ["q_proj"]}}, r"text_encoder.targets=\['q_proj'\] is given"),
             ({"prior": {"class_prompt": None}}, "prior.num_class_images=200 is given but prior.class_prompt is null"),
             ({"prior": {"class_prompt": " "}}, "prior.class_prompt=' '")]
    alone = {"class_prompt": None, "num_class_images": 100}  # a prior setting without a class prompt is refused
    cases += [({"prior": alone | {key: value}}, f"prior.{key}=") for key, value in
              (("class_dir", "cache"), ("num_class_images", 5), ("loss_weight", 0.5), ("sample_steps", 3))]
    dreambooth.validate(copy.deepcopy(raw) | {"prior": alone})  # the defaults alone are fine
    for change, message in cases:
        broken = copy.deepcopy(raw)
        for section, values in change.items():
            broken[section] = {**broken.get(section, {}), **values}
        with pytest.raises(ValueError, match=message):
            dreambooth.validate(broken)
    del raw["data"]["instance_prompt"]
    with pytest.raises(ValueError, match="data.instance_prompt"):
        dreambooth.validate(raw)


# --- the runner ---------------------------------------------------------------------------------
def test_visionpeft_train_runs_a_dreambooth_recipe(pipeline_dir, instance_dir, tmp_path, capsys):
    """v-prediction pipeline, prior preservation, text-encoder adapter, gradient checkpointing, validation grids."""
    vpred = load_pipeline(str(pipeline_dir))
    vpred.scheduler = type(vpred.scheduler).from_config(vpred.scheduler.config, prediction_type="v_prediction")
    vpred.save_pretrained(tmp_path / "vpred")
    recipe = {
        "task": "dreambooth", "model": {"pretrained": str(tmp_path / "vpred")},
        "adapter": {"method": "lora", "options": {"rank": 2}, "targets": ["to_q", "to_k", "to_v", "to_out.0"]},
        "text_encoder": {"method": "lora", "options": {"rank": 2}},
        "data": {"instance_dir": str(instance_dir), "instance_prompt": "a photo of sks dog", "resolution": 32},
        "prior": {"class_prompt": "a photo of dog", "num_class_images": 2, "sample_steps": 2, "sample_batch_size": 2,
                  "loss_weight": 0.5},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "gradient_checkpointing": True},
        "validation": {"prompts": ["a sks dog"], "interval": 2, "images_per_prompt": 2, "steps": 2},
        "output": str(tmp_path / "run"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert cli.main(["train", str(tmp_path / "recipe.yaml"), "train.steps=3", "--quiet"]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["prediction_type"] == "v_prediction" and summary["prior_preservation"] and summary["steps"] == 3
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(r["prior_loss"] for r in rows)
    for r in rows:  # the batch holds instance and class samples, weighted as the recipe says
        assert float(r["loss"]) == pytest.approx(float(r["instance_loss"]) + 0.5 * float(r["prior_loss"]), rel=1e-5)
    assert len(list((run / "class_images").glob("class_*.png"))) == 2
    grids = sorted((run / "validation").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_000002.png", "step_000003.png"]
    assert Image.open(grids[-1]).size == (2 * 32, 32)
    assert (run / "adapter" / "adapter.json").is_file() and (run / "adapter" / "text_encoder" / "adapter.json").is_file()

    fresh = load_pipeline(str(pipeline_dir))
    apply_adapter(fresh, run / "adapter")
    assert vp.core.records(fresh.unet)["default"].method == "lora"
    assert vp.core.records(fresh.text_encoder)["default"].options["rank"] == 2
    ups = [m.factors()[1] for _, layer in adapted_layers(fresh.text_encoder) for m in layer.vp_adapters["default"].values()]
    assert ups and all(up.abs().sum() > 0 for up in ups)  # B starts at zero: the text-encoder adapter was trained
    assert "error" not in capsys.readouterr().err


def test_train_without_prior_preservation(pipeline_dir, instance_dir, tmp_path):
    recipe = dreambooth.validate({
        "task": "dreambooth", "model": {"pretrained": str(pipeline_dir)},
        "adapter": {"method": "flora", "options": {"rank": 2}},
        "data": {"instance_dir": str(instance_dir), "instance_prompt": "a photo of sks dog", "resolution": 32,
                 "center_crop": False},
        "train": {"steps": 3, "batch_size": 3, "lr": 1e-3, "warmup_steps": 1, "schedule": "cosine"},
        "output": str(tmp_path / "run")})
    summary = dreambooth.train(recipe, progress=False)
    assert not summary["prior_preservation"] and summary["prediction_type"] == "epsilon"
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3, 5e-4, 0.0], abs=1e-12)  # after each step's update
    assert all(not r["prior_loss"] and float(r["loss"]) == float(r["instance_loss"]) for r in rows)
    assert not (tmp_path / "run" / "validation").exists() and not (tmp_path / "run" / "adapter" / "text_encoder").exists()


def test_bad_targets_and_prediction_types_fail_before_any_class_image_is_generated(pipeline_dir, instance_dir, tmp_path):
    import shutil

    odd = tmp_path / "sample_prediction"
    shutil.copytree(pipeline_dir, odd)
    config_file = odd / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"prediction_type": "sample"}))
    cases = [("adapter", {"adapter": {"method": "lora", "targets": ["nope"]}}, r"adapter.targets=\['nope'\]"),
             ("text_encoder", {"text_encoder": {"method": "lora", "targets": ["nope"]}}, r"text_encoder.targets"),
             ("prediction", {"model": {"pretrained": str(odd)}}, "'sample' is not supported")]
    for name, change, message in cases:
        recipe = {"task": "dreambooth", "model": {"pretrained": str(pipeline_dir)}, "adapter": {"method": "lora"},
                  "data": {"instance_dir": str(instance_dir), "instance_prompt": "a photo of sks dog", "resolution": 32},
                  "prior": {"class_prompt": "a photo of dog", "num_class_images": 2, "sample_steps": 2},
                  "train": {"steps": 1}, "output": str(tmp_path / name)} | change
        with pytest.raises(ValueError, match=message):
            dreambooth.train(dreambooth.validate(recipe), progress=False)
        assert not list((tmp_path / name).rglob("*.png"))


def test_class_images_are_generated_once_and_tied_to_their_prompt(pipeline, tmp_path):
    folder = tmp_path / "class"
    first = ensure_class_images(pipeline, folder, "a photo of dog", 2, steps=2, batch_size=2, guidance_scale=7.5, seed=0,
                                pretrained="tiny-sd")
    stamps = [p.stat().st_mtime_ns for p in first]
    again = ensure_class_images(pipeline, folder, "a photo of dog", 2, steps=2, batch_size=2, guidance_scale=7.5, seed=0)
    assert again == first and [p.stat().st_mtime_ns for p in again] == stamps
    more = ensure_class_images(pipeline, folder, "a photo of dog", 3, steps=2, batch_size=2, guidance_scale=7.5, seed=0)
    assert more[:2] == first and len(more) == 3
    with pytest.raises(ValueError, match="'a photo of cat'"):
        ensure_class_images(pipeline, folder, "a photo of cat", 2, steps=2, batch_size=2, guidance_scale=7.5, seed=0)
    with pytest.raises(ValueError, match="generated by the model 'tiny-sd', not 'other-sd'"):
        ensure_class_images(pipeline, folder, "a photo of dog", 2, steps=2, batch_size=2, guidance_scale=7.5, seed=0,
                            pretrained="other-sd")


# --- adapters and generation --------------------------------------------------------------------
def trained_like(pipeline, method="svd"):
    pipe = copy.deepcopy(pipeline)
    vp.attach(pipe.unet, method)
    with torch.no_grad():
        for p in vp.trainable_parameters(pipe.unet).values():
            p.add_(torch.randn_like(p) * 0.05)
    return pipe


def test_pipeline_adapter_round_trip_and_scale(pipeline, pipeline_dir, tmp_path):
    tuned = trained_like(pipeline)
    save_pipeline_adapter(tuned, tmp_path / "adapter")
    loaded = apply_adapter(load_pipeline(str(pipeline_dir)), tmp_path / "adapter")
    torch.testing.assert_close(unet_output(loaded), unet_output(tuned), rtol=1e-5, atol=1e-5)
    merged = apply_adapter(load_pipeline(str(pipeline_dir)), tmp_path / "adapter", merge=True)
    torch.testing.assert_close(unet_output(merged), unet_output(tuned), rtol=1e-4, atol=1e-4)
    off = apply_adapter(load_pipeline(str(pipeline_dir)), tmp_path / "adapter", scale=0.0)
    torch.testing.assert_close(unet_output(off), unet_output(pipeline), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="scale='x'"):
        apply_adapter(load_pipeline(str(pipeline_dir)), tmp_path / "adapter", scale="x")


def test_saving_a_pipeline_adapter_replaces_an_earlier_one(pipeline, pipeline_dir, tmp_path):
    with_text = trained_like(pipeline, "lora")
    vp.attach(with_text.text_encoder, "lora", rank=2)
    save_pipeline_adapter(with_text, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "text_encoder" / "adapter.json").is_file()
    save_pipeline_adapter(trained_like(pipeline), tmp_path / "adapter")  # the UNet only, into the same folder
    assert not (tmp_path / "adapter" / "text_encoder").exists()
    fresh = apply_adapter(load_pipeline(str(pipeline_dir)), tmp_path / "adapter")
    assert records(fresh.unet)["default"].method == "svd" and not records(fresh.text_encoder)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="todo.txt"):
        save_pipeline_adapter(with_text, tmp_path / "notes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "notes"]  # no staging folder left behind


def test_applying_an_adapter_is_all_or_nothing(pipeline, pipeline_dir, tmp_path):
    tuned = trained_like(pipeline, "lora")
    vp.attach(tuned.text_encoder, "lora", rank=2)
    save_pipeline_adapter(tuned, tmp_path / "adapter")
    tensors = tmp_path / "adapter" / "text_encoder" / "adapter.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"corrupt!")
    fresh = load_pipeline(str(pipeline_dir))
    before = unet_output(fresh)
    with pytest.raises(ValueError, match="checksum"):
        apply_adapter(fresh, tmp_path / "adapter")
    assert not records(fresh.unet) and not list(adapted_layers(fresh.unet))
    assert torch.equal(unet_output(fresh), before)
    vp.attach(fresh.unet, "lora", targets=["to_q"], name="other")  # an adapter already there stays
    trainable = {n for n, p in fresh.unet.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="checksum"):
        apply_adapter(fresh, tmp_path / "adapter")
    assert list(records(fresh.unet)) == ["other"]
    assert {n for n, p in fresh.unet.named_parameters() if p.requires_grad} == trainable
    assert all(list(layer.vp_adapters) == ["other"] for _, layer in adapted_layers(fresh.unet))


def test_generate_refuses_a_size_that_is_not_a_multiple_of_8(pipeline):
    from visionpeft.models.pipelines import generate

    for size in (0, 30, -8, 8.0):
        with pytest.raises(ValueError, match=f"size={size!r}"):
            generate(pipeline, ["a sks dog"], size=size, steps=1)


def test_load_pipeline_casts_to_the_requested_dtype(pipeline_dir):
    half = load_pipeline(str(pipeline_dir), dtype=torch.bfloat16)
    assert {p.dtype for m in (half.unet, half.vae, half.text_encoder) for p in m.parameters()} == {torch.bfloat16}


def test_generate_writes_images_of_the_requested_size(pipeline, pipeline_dir, tmp_path, capsys):
    tuned = trained_like(pipeline, "lora")
    save_pipeline_adapter(tuned, tmp_path / "adapter")
    args = ["generate", "--pipeline", str(pipeline_dir), "--adapter", str(tmp_path / "adapter"), "--prompt", "a sks dog",
            "a sks dog in the snow", "--num-images", "2", "--steps", "2", "--merge", "--out", str(tmp_path / "out")]
    assert cli.main(args) == 0
    files = sorted((tmp_path / "out").glob("prompt*.png"))
    assert [f.name for f in files] == ["prompt00_00.png", "prompt00_01.png", "prompt01_00.png", "prompt01_01.png"]
    assert all(Image.open(f).size == (32, 32) for f in files)
    assert Image.open(tmp_path / "out" / "grid.png").size == (2 * 32, 2 * 32)  # a row per prompt
    assert cli.main(args[:-2] + ["--size", "48", "--scale", "0.5", "--out", str(tmp_path / "big")]) == 0
    assert Image.open(tmp_path / "big" / "prompt00_00.png").size == (48, 48)
    assert cli.main(["generate", "--pipeline", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert cli.main(["generate", "--pipeline", str(pipeline_dir), "--prompt", "x", "--merge"]) == 2
    assert "give --adapter" in capsys.readouterr().err
