"""DreamBooth-style subject-driven fine-tuning of a Stable Diffusion pipeline with any visionpeft method.

A recipe (``task: dreambooth``) is validated before anything runs::

    model:        pretrained (a local pipeline directory or a hub id), revision, variant
    adapter:      method, options, targets            the UNet's adapter (any registered method)
    text_encoder: method (null: text encoder frozen), options, targets
    data:         instance_dir, instance_prompt ("a photo of sks dog"), resolution, center_crop
    prior:        class_prompt (null: no prior preservation), class_dir, num_class_images, loss_weight,
                  sample_steps, sample_batch_size, guidance_scale
    train:        steps, batch_size, lr, weight_decay, no_decay, warmup_steps, schedule, grad_clip, precision,
                  grad_accum, gradient_checkpointing, seed, device, checkpoint_interval, keep_checkpoints, resume
    validation:   prompts, interval, images_per_prompt, steps, guidance_scale, sampler
    output:       the run directory

Training follows diffusers' ``train_dreambooth_lora.py``: latents from the frozen VAE, DDPM forward noising with
the scheduler of the pipeline (uniform timesteps), the ε or v target its ``prediction_type`` names, and with prior
preservation each batch holds instance and class samples: L = MSE(instance) + λ·MSE(class), plus
``vp.regularization``. AdamW decays no parameter that matches ``train.no_decay`` (as in the classification
recipes: biases, norms and every 1-D tensor, such as SVD's singular values and SaRA's selected weights, which start
at the pretrained values); the learning rate warms up linearly from 0 over ``warmup_steps`` (diffusers'
convention), then stays constant or follows a cosine to 0. The output folder gets ``adapter/`` (``vp.save`` of the
UNet, ``adapter/text_encoder/`` when the text encoder trains; the folder is replaced as a whole), ``validation/
step_<N>.png`` grids, ``metrics.csv``, ``summary.json`` and ``recipe.json``. Checkpoints (trainable state only) go to
``checkpoints/step_<N>`` at each validation by default, and resume as in the classification runner
(:mod:`visionpeft.training.checkpoints`: ``train.resume=auto`` continues a run of the same settings, reports a
finished one, refuses other settings; Ctrl-C writes a checkpoint). ``train.precision=auto`` (the default) is bf16 or
fp16 on a GPU and full precision on the CPU, where fp16 is several times slower.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from visionpeft.training.interrupt import handles_ctrl_c
from visionpeft.training.launch import progress_enabled
from visionpeft.training.outputs import write_csv, write_json
from visionpeft.training.recipe import (
    ADAPTER_SECTION, NUMBER, REQUIRED, apply_overrides, check_method_options, read_yaml, validate_schema,
)
from visionpeft.models.pipelines import PREDICTION_TYPES
from visionpeft.training.recipe import SCHEMA as CLASSIFICATION_SCHEMA

TASK = "dreambooth"
NULL = type(None)
SCHEMA: dict[str, Any] = {
    "task": ((str,), REQUIRED),
    "model": {
        "pretrained": ((str,), REQUIRED),
        "revision": ((str, NULL), None),
        "variant": ((str, NULL), None),
    },
    "adapter": ADAPTER_SECTION,
    "text_encoder": {
        "method": ((str, NULL), None),
        "options": ((dict,), {}),
        "targets": ((str, list, NULL), None),
    },
    "data": {
        "instance_dir": ((str,), REQUIRED),
        "instance_prompt": ((str,), REQUIRED),
        "resolution": ((int,), 512),
        "center_crop": ((bool,), True),
        "num_workers": ((int,), 0),
    },
    "prior": {
        "class_prompt": ((str, NULL), None),
        "class_dir": ((str, NULL), None),
        "num_class_images": ((int,), 100),
        "loss_weight": (NUMBER, 1.0),
        "sample_steps": ((int,), 25),
        "sample_batch_size": ((int,), 4),
        "guidance_scale": (NUMBER, 7.5),
    },
    "train": {
        "steps": ((int,), 500),
        "batch_size": ((int,), 1),
        "lr": (NUMBER, 1e-4),
        "weight_decay": (NUMBER, 1e-2),
        "no_decay": ((list,), CLASSIFICATION_SCHEMA["train"]["no_decay"][1]),
        "warmup_steps": ((int,), 0),
        "schedule": ((str,), "constant"),
        "grad_clip": ((int, float, NULL), 1.0),
        "precision": ((str,), "auto"),
        "grad_accum": ((int,), 1),
        "gradient_checkpointing": ((bool,), False),
        "seed": ((int,), 0),
        "device": ((str,), "auto"),
        "checkpoint_interval": ((int, str, NULL), "eval"),
        "keep_checkpoints": ((int, NULL), 2),
        "resume": ((str, NULL), None),
    },
    "validation": {
        "prompts": ((list,), []),
        "interval": ((int,), 100),
        "images_per_prompt": ((int,), 2),
        "steps": ((int,), 25),
        "guidance_scale": (NUMBER, 7.5),
        "sampler": ((str,), "dpmsolver"),
    },
    "output": ((str,), REQUIRED),
}
CHOICES = {
    "task": (TASK,),
    "train.precision": ("auto", "no", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.schedule": ("constant", "cosine"),
    "validation.sampler": ("dpmsolver", "pipeline"),
}
POSITIVE = ("data.resolution", "prior.num_class_images", "prior.sample_steps", "prior.sample_batch_size", "train.steps",
            "train.batch_size", "train.grad_accum", "validation.interval",
            "validation.images_per_prompt", "validation.steps")


# --- the recipe ---------------------------------------------------------------------------------
def validate(raw: Any, source: str = "recipe") -> dict[str, Any]:
    """A complete DreamBooth recipe (defaults filled in); a ValueError names the first bad key and what is allowed."""
    recipe = validate_schema(raw, SCHEMA, CHOICES, source)
    _check_semantics(recipe, source)
    return recipe


def _check_semantics(recipe: dict[str, Any], source: str) -> None:
    for key in POSITIVE:
        section, name = key.split(".")
        if recipe[section][name] < 1:
            raise ValueError(f"{source}: {key}={recipe[section][name]!r} must be >= 1")
    train = recipe["train"]
    if train["lr"] <= 0 or train["weight_decay"] < 0 or train["warmup_steps"] < 0:
        raise ValueError(f"{source}: need train.lr > 0, train.weight_decay >= 0 and train.warmup_steps >= 0 (got "
                         f"{train['lr']!r}, {train['weight_decay']!r}, {train['warmup_steps']!r})")
    if train["grad_clip"] is not None and train["grad_clip"] <= 0:
        raise ValueError(f"{source}: train.grad_clip={train['grad_clip']!r} must be > 0, or null for no clipping")
    interval = train["checkpoint_interval"]
    if (isinstance(interval, str) and interval != "eval") or (isinstance(interval, int) and interval < 1):
        raise ValueError(f"{source}: train.checkpoint_interval={interval!r} must be 'eval' (at each validation), a "
                         f"number of steps >= 1, or null (no checkpoints)")
    if not all(isinstance(rule, str) and rule for rule in train["no_decay"]):
        raise ValueError(f"{source}: train.no_decay={train['no_decay']!r} must be a list of parameter-name fragments "
                         f"(or '1d' for every tensor of at most one dimension)")
    if recipe["data"]["resolution"] % 8:
        raise ValueError(f"{source}: data.resolution={recipe['data']['resolution']!r} must be a multiple of 8")
    if recipe["prior"]["loss_weight"] < 0:
        raise ValueError(f"{source}: prior.loss_weight={recipe['prior']['loss_weight']!r} must be >= 0")
    if not all(isinstance(p, str) and p for p in recipe["validation"]["prompts"]):
        raise ValueError(f"{source}: validation.prompts must be a list of non-empty strings, "
                         f"got {recipe['validation']['prompts']!r}")
    _check_prior(recipe["prior"], source)
    for section in ("adapter", "text_encoder"):
        method = recipe[section]["method"]
        if method is None:
            for key in ("options", "targets"):
                if recipe[section][key]:
                    raise ValueError(f"{source}: {section}.{key}={recipe[section][key]!r} is given without "
                                     f"{section}.method (null: the {section.replace('_', ' ')} is not adapted)")
            continue
        check_method_options(method, recipe[section]["options"], source, section)


def _check_prior(prior: dict[str, Any], source: str) -> None:
    """Without a class prompt there is no prior preservation: any other prior setting would be silently ignored."""
    if prior["class_prompt"] is not None:
        if not prior["class_prompt"].strip():
            raise ValueError(f"{source}: prior.class_prompt={prior['class_prompt']!r} must be a non-empty prompt, "
                             f"or null for no prior preservation")
        return
    for key, value in prior.items():
        if key != "class_prompt" and value != SCHEMA["prior"][key][1]:
            raise ValueError(f"{source}: prior.{key}={value!r} is given but prior.class_prompt is null (no prior "
                             f"preservation, so it would be ignored); set prior.class_prompt or remove prior.{key}")


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a DreamBooth recipe file, apply dotted overrides (``train.steps=2``), validate."""
    return validate(apply_overrides(read_yaml(path), list(overrides)), source=str(path))


# --- the objective ------------------------------------------------------------------------------
@dataclasses.dataclass
class LossParts:
    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def check_prediction_type(scheduler) -> str:
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {kind!r} is not supported; allowed: {', '.join(PREDICTION_TYPES)}")
    return kind


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, as the scheduler config says: the noise ε, or the velocity v."""
    if check_prediction_type(scheduler) == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def dreambooth_loss(prediction: torch.Tensor, target: torch.Tensor, num_instance: int, prior_weight: float) -> LossParts:
    """MSE on the first ``num_instance`` samples, plus ``prior_weight`` × MSE on the rest (the class samples)."""
    if not 0 < num_instance <= prediction.shape[0]:
        raise ValueError(f"num_instance={num_instance} must be in 1..{prediction.shape[0]} (the batch size)")
    instance = F.mse_loss(prediction[:num_instance].float(), target[:num_instance].float())
    if num_instance == prediction.shape[0]:
        return LossParts(instance, instance, None)
    prior = F.mse_loss(prediction[num_instance:].float(), target[num_instance:].float())
    return LossParts(instance + prior_weight * prior, instance, prior)


def assemble_batch(batch: dict[str, torch.Tensor], states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(pixels, text states, number of instance samples) of one training batch: the instance images followed by
    the class images (with prior preservation), each sample with the states of its prompt. ``states`` holds the
    encoded instance prompt and, with prior preservation, the class prompt: shape (1 or 2, tokens, width)."""
    pixels = batch["instance"]
    n_instance = pixels.shape[0]
    if "class" in batch:
        if states.shape[0] < 2:
            raise ValueError(f"the batch has class images but states holds {states.shape[0]} prompt(s); need the "
                             f"instance and the class prompt")
        pixels = torch.cat([pixels, batch["class"]])
    rows = torch.cat([states[:1].expand(n_instance, -1, -1), states[1:2].expand(pixels.shape[0] - n_instance, -1, -1)])
    return pixels, rows, n_instance


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


def noisy_sample(scheduler, latents: torch.Tensor, generator: torch.Generator | None = None):
    """(noisy latents, noise, timesteps) of DDPM's forward process at uniformly drawn timesteps."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device,
                              generator=generator).long()
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


# --- the run ------------------------------------------------------------------------------------
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _attach(model, spec: dict[str, Any]):
    import visionpeft as vp

    return vp.attach(model, spec["method"], targets=spec["targets"], **spec["options"])


def lr_factor(cfg: dict[str, Any]):
    """LambdaLR factor: linear warm-up from 0 over ``warmup_steps``, then constant or cosine to 0."""
    from visionpeft.training.runner import lr_lambda

    min_lr = cfg["lr"] if cfg["schedule"] == "constant" else 0.0
    return lr_lambda(cfg["lr"], 0.0, min_lr, cfg["warmup_steps"], cfg["steps"])


def optimizer_groups(models: list, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trained models: ``train.weight_decay``, none for ``train.no_decay`` matches."""
    from visionpeft.training.runner import param_groups

    return [group for model in models for group in param_groups(model, cfg["weight_decay"], cfg["no_decay"])]


def check_pipeline(pipeline, recipe: dict[str, Any]) -> None:
    """What the loaded pipeline must allow, checked before any class image is generated: a supported
    prediction type, and targets that select layers of the UNet (and of the text encoder when it is adapted)."""
    from visionpeft.targeting import resolve_targets

    try:
        check_prediction_type(_training_scheduler(pipeline))
    except ValueError as err:
        raise ValueError(f"model.pretrained={recipe['model']['pretrained']!r}: {err}") from None
    for section, model in (("adapter", pipeline.unet), ("text_encoder", pipeline.text_encoder)):
        if recipe[section]["method"] is None:
            continue
        try:
            resolve_targets(model, recipe[section]["targets"])
        except ValueError as err:
            raise ValueError(f"{section}.targets={recipe[section]['targets']!r}: {err}") from None


def enable_text_checkpointing(text_encoder) -> None:
    """Non-reentrant activation checkpointing of a transformers text encoder. Reentrant checkpointing (the default
    of transformers 4.x) gives the adapters inside a checkpointed layer no gradient when the layer's input needs
    none, as the frozen token embeddings' output does not; where only reentrant checkpointing exists, the input
    embeddings are made to require grad instead."""
    kwargs = {"use_reentrant": False}
    if hasattr(text_encoder, "activation_checkpointing_enable"):  # transformers 5
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif "gradient_checkpointing_kwargs" in inspect.signature(text_encoder.gradient_checkpointing_enable).parameters:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        text_encoder.gradient_checkpointing_enable()
        text_encoder.enable_input_require_grads()


def _validation_grid(pipeline, cfg: dict[str, Any], seed: int, path: Path, models, accelerator) -> Path:
    from visionpeft.models.pipelines import generate, image_grid, save_image

    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        # under mixed precision accelerate makes the UNet return float32; autocast keeps the half-precision VAE fed
        with accelerator.autocast():
            images = generate(pipeline, cfg["prompts"], images_per_prompt=cfg["images_per_prompt"], steps=cfg["steps"],
                              guidance_scale=cfg["guidance_scale"], seed=seed, sampler=cfg["sampler"])
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return save_image(image_grid(images, columns=cfg["images_per_prompt"]), path)


@handles_ctrl_c
def train(recipe: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Run a validated DreamBooth recipe (see :func:`validate`); returns the summary (also in summary.json)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    import visionpeft as vp
    from visionpeft.models.pipelines import load_pipeline, save_pipeline_adapter
    from visionpeft.training.dreambooth_data import DreamBoothImages, ensure_class_images, list_images
    from visionpeft.training import checkpoints
    from visionpeft.training.resumable import ResumableSteps
    from visionpeft.training.runner import make_accelerator, peak_memory_mb
    from visionpeft.training.schedule import EpochOrder

    cfg, data, prior, val = recipe["train"], recipe["data"], recipe["prior"], recipe["validation"]
    instance_images = list_images(data["instance_dir"], "data.instance_dir")
    if not instance_images:
        raise ValueError(f"data.instance_dir {data['instance_dir']!r} holds no image")
    output = Path(recipe["output"])
    decision = checkpoints.plan(recipe)  # before anything in the output folder changes
    accelerator = make_accelerator(recipe)
    if decision.action == "finished":
        accelerator.print(decision.message)
        return decision.summary
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        if decision.action == "fresh":
            checkpoints.start_fresh(output)
        write_json(output / "recipe.json", recipe)
    set_seed(cfg["seed"])
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]  # train.precision=auto resolved for the device
    pipeline = load_pipeline(recipe["model"]["pretrained"], dtype=weight_dtype, revision=recipe["model"]["revision"],
                             variant=recipe["model"]["variant"])
    pipeline.to(accelerator.device)
    check_pipeline(pipeline, recipe)
    unet, vae, text_encoder, tokenizer = pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer
    noise_scheduler = _training_scheduler(pipeline)

    class_images = None
    if prior["class_prompt"]:
        class_dir = prior["class_dir"] or str(output / "class_images")
        if accelerator.is_main_process:
            ensure_class_images(pipeline, class_dir, prior["class_prompt"], prior["num_class_images"],
                                steps=prior["sample_steps"], batch_size=prior["sample_batch_size"],
                                guidance_scale=prior["guidance_scale"], seed=cfg["seed"], size=data["resolution"],
                                progress=progress, pretrained=recipe["model"]["pretrained"])
        accelerator.wait_for_everyone()
        class_images = list_images(class_dir, "prior.class_dir")[:prior["num_class_images"]]

    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    _attach(unet, recipe["adapter"])  # after the cast: adapters on half-precision bases keep float32 parameters
    train_text = recipe["text_encoder"]["method"] is not None
    if train_text:
        _attach(text_encoder, recipe["text_encoder"])
    if cfg["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
        if train_text:
            enable_text_checkpointing(text_encoder)
    trained = [unet] + ([text_encoder] if train_text else [])
    groups = optimizer_groups(trained, cfg)
    params = [p for group in groups for p in group["params"]]
    trainable = sum(p.numel() for p in params)

    dataset = DreamBoothImages(instance_images, data["resolution"], data["center_crop"], class_images)
    order = EpochOrder(len(dataset), cfg["seed"])  # the same order after a resume
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg["batch_size"], sampler=order, drop_last=False,
                                         num_workers=data["num_workers"], generator=torch.Generator())
    batches_per_epoch = len(loader)
    optimizer = torch.optim.AdamW(groups, lr=cfg["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    prepared = accelerator.prepare(*trained, optimizer, loader, scheduler)
    unet_run = prepared[0]
    text_run = prepared[1] if train_text else text_encoder
    optimizer, loader, scheduler = prepared[-3:]
    every = val["interval"] if cfg["checkpoint_interval"] == "eval" else cfg["checkpoint_interval"]
    resumable = ResumableSteps(recipe, accelerator, decision, order, batches_per_epoch, every)
    state = resumable.restore()

    with torch.no_grad():
        prompts = [data["instance_prompt"]] + ([prior["class_prompt"]] if class_images else [])
        fixed = None if train_text else encode_prompts(tokenizer, text_encoder, prompts, accelerator.device)

    history: list[dict[str, Any]] = state.get("history", [])
    grids: list[str] = state.get("grids", [])
    step_times: list[float] = []
    total = cfg["steps"]
    bar = tqdm(total=total, initial=state["step"], desc=f"dreambooth {recipe['adapter']['method']}", unit="step",
               disable=not progress_enabled(progress, accelerator))
    window: list[LossParts] = []
    step, start = state["step"], time.perf_counter()
    for model in trained:
        model.train()
    while step < total:
        for batch in resumable.epoch(loader, step):
            with accelerator.accumulate(*[unet_run] + ([text_run] if train_text else [])):
                encoded = fixed if fixed is not None else encode_prompts(tokenizer, text_run, prompts, accelerator.device)
                pixels, states, n_instance = assemble_batch(batch, encoded)
                with torch.no_grad():
                    latents = vae.encode(pixels.to(weight_dtype)).latent_dist.sample()
                    latents = (latents * vae.config.scaling_factor).float()
                noisy, noise, timesteps = noisy_sample(noise_scheduler, latents)
                prediction = unet_run(noisy.to(weight_dtype), timesteps, states.to(weight_dtype)).sample
                target = diffusion_target(noise_scheduler, latents, noise, timesteps)
                parts = dreambooth_loss(prediction, target, n_instance, prior["loss_weight"])
                loss = parts.total + sum(vp.regularization(m) for m in trained)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg["grad_clip"] is not None:
                    accelerator.clip_grad_norm_(params, cfg["grad_clip"])
                optimizer.step()
                if accelerator.sync_gradients:
                    for m in trained:
                        vp.step(m, step + 1, total)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window.append(LossParts(parts.total.detach(), parts.instance.detach(),
                                    None if parts.prior is None else parts.prior.detach()))
            if not accelerator.sync_gradients:
                continue
            step += 1
            seconds = time.perf_counter() - start
            step_times.append(seconds)
            record = _record(step, window, scheduler.get_last_lr()[0], seconds)
            history.append(record)
            window = []
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.1e}")
            if val["prompts"] and (step % val["interval"] == 0 or step == total) and accelerator.is_main_process:
                grid = _validation_grid(pipeline, val, cfg["seed"], output / "validation" / f"step_{step:06d}.png",
                                        trained, accelerator)
                grids.append(str(grid))
            resumable.after_step(step, total, {"history": history, "grids": grids})
            start = time.perf_counter()
            if step >= total:
                break
    bar.close()
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        save_pipeline_adapter(unet, output / "adapter", text_encoder if train_text else None)
        write_csv(output / "metrics.csv", history, ["step", "loss", "instance_loss", "prior_loss", "lr", "seconds"])
        summary = {
            "task": TASK,
            "method": recipe["adapter"]["method"],
            "text_encoder_method": recipe["text_encoder"]["method"],
            "prediction_type": noise_scheduler.config.prediction_type,
            "prior_preservation": class_images is not None,
            "class_images": len(class_images or []),
            "instance_images": len(instance_images),
            "trainable_parameters": trainable,
            "steps": step,
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None,
            "step_time_s": statistics.median(step_times) if step_times else None,
            "peak_memory_mb": peak_memory_mb(accelerator.device),
            "processes": accelerator.num_processes,
            "adapter": str(output / "adapter"),
            "output": str(output),
            "fingerprint": checkpoints.fingerprint(recipe),
            "validation_grids": grids,
        }
        write_json(output / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary


def _training_scheduler(pipeline):
    """DDPM with the pipeline's noise schedule and prediction type (the pipeline may ship another sampler)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipeline.scheduler.config)


def _record(step: int, window: list[LossParts], lr: float, seconds: float) -> dict[str, Any]:
    priors = [p.prior.item() for p in window if p.prior is not None]
    return {"step": step, "loss": statistics.mean(p.total.item() for p in window),
            "instance_loss": statistics.mean(p.instance.item() for p in window),
            "prior_loss": statistics.mean(priors) if priors else None, "lr": lr, "seconds": seconds}
