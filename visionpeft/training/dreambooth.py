"""DreamBooth-style subject-driven fine-tuning of a diffusion pipeline (SD-1.x/2.x, SDXL, SD3, FLUX) with any
visionpeft method.

A recipe (``task: dreambooth``) is validated before anything runs::

    model:        pretrained (a local pipeline directory or a hub id), revision, variant
    adapter:      method, options, targets            the denoiser's adapter (UNet or transformer; any method)
    text_encoder: method (null: text encoders frozen), options, targets, components (null: the pipeline's CLIP
                  encoders, see ``visionpeft.models.pipeline_kinds``; or a list such as [text_encoder_2])
    data:         instance_dir, instance_prompt ("a photo of sks dog"), resolution, center_crop, cache_latents,
                  cache_text_embeddings, cache_dir, max_sequence_length (T5 tokens; null: 77 for SD3, 512 for FLUX)
    prior:        class_prompt (null: no prior preservation), class_dir, num_class_images, loss_weight,
                  sample_steps, sample_batch_size, guidance_scale
    train:        steps, batch_size, lr, weight_decay, no_decay, warmup_steps, schedule, grad_clip, precision,
                  grad_accum, gradient_checkpointing, seed, device,
                  checkpoint_interval, keep_checkpoints, resume,
                  snr_gamma, noise_offset                                            (ε/v models)
                  weighting_scheme, logit_mean, logit_std, mode_scale, guidance_scale (flow models; guidance: FLUX)
    validation:   prompts, interval, images_per_prompt, steps, guidance_scale, sampler
    output:       the run directory

Training follows diffusers' DreamBooth LoRA scripts for each pipeline (``visionpeft.training.conditioning``: prompt
states, SDXL's time ids, FLUX's packing and guidance; ``visionpeft.training.objectives``: DDPM ε/v with min-SNR and
offset noise, or flow matching with its weighting schemes). Latents come from the frozen VAE (or its cache), and
with prior preservation each batch holds instance and class samples: L = MSE(instance) + λ·MSE(class), each sample's
squared error times its loss weight, plus ``vp.regularization``. AdamW decays no parameter that matches
``train.no_decay`` (as in the classification recipes: biases, norms and every 1-D tensor, such as SVD's singular
values and SaRA's selected weights, which start at the pretrained values); the learning rate warms up linearly from
0 over ``warmup_steps`` (diffusers' convention), then stays constant or follows a cosine to 0. The output folder gets
``adapter/`` (``vp.save`` of the denoiser, ``adapter/<text encoder component>/`` for each adapted text encoder; the
folder is replaced as a whole), ``validation/step_<N>.png`` grids, ``metrics.csv``, ``summary.json`` and
``recipe.json``. Checkpoints (trainable state only) go to
``checkpoints/step_<N>`` at each validation by default, and resume as in the classification runner
(:mod:`visionpeft.training.checkpoints`: ``train.resume=auto`` continues a run of the same settings, reports a
finished one, refuses other settings; Ctrl-C writes a checkpoint). ``train.precision=auto`` (the default) is bf16 or
fp16 on a GPU and full precision on the CPU, where fp16 is several times slower.
"""
from __future__ import annotations

import dataclasses
import inspect
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from visionpeft.training.dreambooth_recipe import SCHEMA, TASK, load_recipe, validate  # noqa: F401 (the task's API)
from visionpeft.training.interrupt import handles_ctrl_c
from visionpeft.training.launch import progress_enabled
from visionpeft.training.outputs import write_csv, write_json
from visionpeft.training import objectives
from visionpeft.training.objectives import check_prediction_type, diffusion_target, noisy_sample  # noqa: F401


# --- the objective ------------------------------------------------------------------------------
@dataclasses.dataclass
class LossParts:
    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def dreambooth_loss(prediction: torch.Tensor, target: torch.Tensor, num_instance: int, prior_weight: float,
                    weights: torch.Tensor | None = None) -> LossParts:
    """MSE on the first ``num_instance`` samples, plus ``prior_weight`` × MSE on the rest (the class samples).
    ``weights``: a loss weight per sample (min-SNR, a flow-matching scheme), multiplying its mean squared error."""
    if not 0 < num_instance <= prediction.shape[0]:
        raise ValueError(f"num_instance={num_instance} must be in 1..{prediction.shape[0]} (the batch size)")
    if weights is None:
        errors = None
    else:
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
        errors = per_sample * weights.float().reshape(-1)
    instance = (F.mse_loss(prediction[:num_instance].float(), target[:num_instance].float()) if errors is None
                else errors[:num_instance].mean())
    if num_instance == prediction.shape[0]:
        return LossParts(instance, instance, None)
    prior = (F.mse_loss(prediction[num_instance:].float(), target[num_instance:].float()) if errors is None
             else errors[num_instance:].mean())
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


def text_components(pipeline, recipe: dict[str, Any]) -> list[str]:
    """The text encoders the recipe adapts: ``text_encoder.components``, or the pipeline's CLIP encoders; none when
    ``text_encoder.method`` is null. A component the pipeline lacks is refused with those it has."""
    from visionpeft.models.pipeline_kinds import kind_of, text_encoders

    if recipe["text_encoder"]["method"] is None:
        return []
    kind = kind_of(pipeline)
    wanted = recipe["text_encoder"]["components"] or list(kind.default_text_encoders)
    present = text_encoders(pipeline)
    missing = [c for c in wanted if c not in present]
    if missing:
        raise ValueError(f"text_encoder.components={wanted!r}: this {kind.pipeline_class} has no {missing[0]!r}; its "
                         f"text encoders: {', '.join(present)}")
    return wanted


def check_pipeline(pipeline, recipe: dict[str, Any]) -> None:
    """What the loaded pipeline must allow, checked before any class image is generated: a supported pipeline class
    and prediction type, objective options its kind reads, text encoder components it has, and targets that select
    layers of the denoiser (and of each adapted text encoder)."""
    from visionpeft.models.pipeline_kinds import denoiser, kind_of
    from visionpeft.targeting import resolve_targets

    try:
        objectives.make_objective(pipeline, recipe["train"])
    except ValueError as err:
        raise ValueError(f"model.pretrained={recipe['model']['pretrained']!r}: {err}") from None
    patch = 2 if kind_of(pipeline).name == "flux" else getattr(denoiser(pipeline).config, "patch_size", 1)
    multiple = pipeline.vae_scale_factor * patch
    if recipe["data"]["resolution"] % multiple:
        raise ValueError(f"data.resolution={recipe['data']['resolution']!r} must be a multiple of {multiple} for this "
                         f"{type(pipeline).__name__} (VAE factor {pipeline.vae_scale_factor} × patch {patch})")
    models = [("adapter", denoiser(pipeline))] if recipe["adapter"]["method"] else []
    models += [("text_encoder", getattr(pipeline, c)) for c in text_components(pipeline, recipe)]
    for section, model in models:
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


def _validation_grid(pipeline, cfg: dict[str, Any], seed: int, path: Path, models, accelerator, size: int) -> Path:
    from visionpeft.models.pipelines import generate, image_grid, save_image

    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        # under mixed precision accelerate makes the UNet return float32; autocast keeps the half-precision VAE fed
        with accelerator.autocast():
            images = generate(pipeline, cfg["prompts"], images_per_prompt=cfg["images_per_prompt"], steps=cfg["steps"],
                              guidance_scale=cfg["guidance_scale"], seed=seed, sampler=cfg["sampler"], size=size)
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
    from visionpeft.models.pipeline_kinds import denoiser as pipeline_denoiser, kind_of, text_encoders
    from visionpeft.models.pipelines import load_pipeline, save_pipeline_adapter
    from visionpeft.training.caching import batch_latents, latent_dataset, text_embeddings
    from visionpeft.training.conditioning import conditioning_for, rows
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
    kind = kind_of(pipeline)
    denoiser, vae, encoders = pipeline_denoiser(pipeline), pipeline.vae, text_encoders(pipeline)
    objective = objectives.make_objective(pipeline, cfg)
    conditioning = conditioning_for(pipeline, max_sequence_length=data["max_sequence_length"],
                                    guidance_scale=objectives.guidance_scale(pipeline, cfg))

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

    for model in (denoiser, vae, *encoders.values()):
        model.requires_grad_(False)
    if recipe["adapter"]["method"] is not None:
        _attach(denoiser, recipe["adapter"])  # after the cast: adapters on half-precision bases keep float32 parameters
    adapted_text = text_components(pipeline, recipe)
    for name in adapted_text:
        _attach(encoders[name], recipe["text_encoder"])
    if cfg["gradient_checkpointing"]:
        denoiser.enable_gradient_checkpointing()
        for name in adapted_text:
            enable_text_checkpointing(encoders[name])
    trained = [denoiser] + [encoders[name] for name in adapted_text]
    groups = optimizer_groups(trained, cfg)
    params = [p for group in groups for p in group["params"]]
    trainable = sum(p.numel() for p in params)

    dataset = DreamBoothImages(instance_images, data["resolution"], data["center_crop"], class_images)
    cache_dir = Path(data["cache_dir"] or output / "cache")
    if data["cache_latents"]:
        dataset = latent_dataset(dataset, cache_dir, recipe, instance_images, class_images, vae, weight_dtype,
                                 accelerator)
    order = EpochOrder(len(dataset), cfg["seed"])  # the same order after a resume
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg["batch_size"], sampler=order, drop_last=False,
                                         num_workers=data["num_workers"], generator=torch.Generator())
    batches_per_epoch = len(loader)
    optimizer = torch.optim.AdamW(groups, lr=cfg["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    prepared = accelerator.prepare(*trained, optimizer, loader, scheduler)
    denoiser_run = prepared[0]
    encoders_run = dict(encoders) | dict(zip(adapted_text, prepared[1:len(trained)]))
    optimizer, loader, scheduler = prepared[-3:]
    every = val["interval"] if cfg["checkpoint_interval"] == "eval" else cfg["checkpoint_interval"]
    resumable = ResumableSteps(recipe, accelerator, decision, order, batches_per_epoch, every)
    state = resumable.restore()

    prompts = [data["instance_prompt"]] + ([prior["class_prompt"]] if class_images else [])
    fixed = None
    if not adapted_text:
        with torch.no_grad():
            def encode():
                return conditioning.encode(prompts, encoders, accelerator.device)

            fixed = encode() if not data["cache_text_embeddings"] else text_embeddings(
                cache_dir, recipe, prompts, conditioning, encode, accelerator)

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
            with accelerator.accumulate(*prepared[:len(trained)]):
                encoded = fixed if fixed is not None else conditioning.encode(prompts, encoders_run, accelerator.device)
                latents, extras, n_instance = batch_latents(batch, vae, weight_dtype)
                cond = {k: v.to(weight_dtype) for k, v in rows(encoded, n_instance, latents.shape[0]).items()}
                noised = objective.noised(latents)
                prediction = conditioning.predict(denoiser_run, noised.noisy.to(weight_dtype), noised.timesteps, cond,
                                                  extras)
                parts = dreambooth_loss(prediction, noised.target, n_instance, prior["loss_weight"], noised.weights)
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
                                        trained, accelerator, data["resolution"])
                grids.append(str(grid))
            resumable.after_step(step, total, {"history": history, "grids": grids})
            start = time.perf_counter()
            if step >= total:
                break
    bar.close()
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        save_pipeline_adapter(denoiser, output / "adapter", text_encoders={n: encoders[n] for n in adapted_text})
        write_csv(output / "metrics.csv", history, ["step", "loss", "instance_loss", "prior_loss", "lr", "seconds"])
        summary = {
            "task": TASK,
            "pipeline": kind.pipeline_class,
            "method": recipe["adapter"]["method"],
            "text_encoder_method": recipe["text_encoder"]["method"],
            "text_encoders": adapted_text,
            "objective": objective.kind,
            "prediction_type": getattr(objective, "prediction_type", "flow_matching"),
            "weighting_scheme": getattr(objective, "weighting_scheme", None),
            "prior_preservation": class_images is not None,
            "class_images": len(class_images or []),
            "instance_images": len(instance_images),
            "cached_latents": data["cache_latents"],
            "cached_text_embeddings": fixed is not None and data["cache_text_embeddings"],
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


def _record(step: int, window: list[LossParts], lr: float, seconds: float) -> dict[str, Any]:
    priors = [p.prior.item() for p in window if p.prior is not None]
    return {"step": step, "loss": statistics.mean(p.total.item() for p in window),
            "instance_loss": statistics.mean(p.instance.item() for p in window),
            "prior_loss": statistics.mean(priors) if priors else None, "lr": lr, "seconds": seconds}
