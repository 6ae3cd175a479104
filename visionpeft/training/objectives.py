"""The training objective of each pipeline kind, and the recipe options that belong to it.

ε/v models (SD-1.x/2.x, SDXL): DDPM forward noising at uniformly drawn timesteps with the scheduler of the pipeline,
the ε or v target its ``prediction_type`` names, and two options of diffusers' scripts:

* ``train.noise_offset``: noise + offset · N(0, 1) per sample and channel (constant over the image), so the model
  learns to change the mean brightness;
* ``train.snr_gamma``: min-SNR loss weights (Hang et al. 2023), min(SNR, γ) / SNR for ε and min(SNR, γ) / (SNR + 1)
  for v, per sample (SNR from diffusers' ``compute_snr``).

Flow models (SD3, FLUX): ``visionpeft.training.flow_matching`` with ``train.weighting_scheme``, ``logit_mean``,
``logit_std``, ``mode_scale``; FLUX's transformer also reads ``train.guidance_scale`` (its embedded guidance).

An option of the other kind is refused by name, with the options the pipeline reads.
"""
from __future__ import annotations

from typing import Any

import torch

from visionpeft.models.pipelines import PREDICTION_TYPES
from visionpeft.training.flow_matching import FLOW_DEFAULTS, FlowMatching, NoisedBatch, check_weighting_scheme

NULL = type(None)
OPTIONAL_NUMBER = (int, float, NULL)
DIFFUSION_OPTIONS = ("snr_gamma", "noise_offset")
FLOW_OPTIONS = tuple(FLOW_DEFAULTS)
GUIDANCE_OPTIONS = ("guidance_scale",)
#: FLUX.1-dev's training guidance in diffusers' script
DEFAULT_GUIDANCE = 3.5
#: the train.* schema entries of the objectives: null means "not given" (each kind's default applies)
SCHEMA = {name: (OPTIONAL_NUMBER, None) for name in (*DIFFUSION_OPTIONS, "logit_mean", "logit_std", "mode_scale",
                                                     *GUIDANCE_OPTIONS)} | {"weighting_scheme": ((str, NULL), None)}


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


def noisy_sample(scheduler, latents: torch.Tensor, generator: torch.Generator | None = None, noise_offset: float = 0.0):
    """(noisy latents, noise, timesteps) of DDPM's forward process at uniformly drawn timesteps."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], *(1,) * (latents.dim() - 2)),
                                                   generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device,
                              generator=generator).long()
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample min-SNR loss weights for the scheduler's prediction type."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1 if check_prediction_type(scheduler) == "v_prediction" else snr)


class Diffusion:
    """Noised batches of DDPM training for an ε or v model."""

    kind = "diffusion"

    def __init__(self, scheduler_config, *, snr_gamma: float | None = None, noise_offset: float | None = None) -> None:
        from diffusers import DDPMScheduler

        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"train.snr_gamma={snr_gamma!r} must be > 0 (diffusers' scripts use 5.0), or null")
        if noise_offset is not None and noise_offset < 0:
            raise ValueError(f"train.noise_offset={noise_offset!r} must be >= 0, or null")
        # DDPM with the pipeline's noise schedule and prediction type (the pipeline may ship another sampler)
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        check_prediction_type(self.scheduler)
        self.snr_gamma, self.noise_offset = snr_gamma, noise_offset or 0.0

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def noised(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> NoisedBatch:
        noisy, noise, timesteps = noisy_sample(self.scheduler, latents, generator, self.noise_offset)
        weights = None if self.snr_gamma is None else min_snr_weights(self.scheduler, timesteps, self.snr_gamma)
        return NoisedBatch(noisy, diffusion_target(self.scheduler, latents, noise, timesteps), timesteps, weights)


def make_objective(pipeline, train: dict[str, Any]):
    """The objective of ``pipeline``'s kind with the recipe's ``train`` options; a ValueError names an option the
    kind does not read and lists those it does."""
    from visionpeft.models.pipeline_kinds import denoiser, kind_of

    kind = kind_of(pipeline)
    guided = kind.name == "flux" and bool(getattr(denoiser(pipeline).config, "guidance_embeds", False))
    allowed = DIFFUSION_OPTIONS if kind.objective == "diffusion" else FLOW_OPTIONS + (GUIDANCE_OPTIONS if guided else ())
    given = [name for name in SCHEMA if train.get(name) is not None]
    foreign = [name for name in given if name not in allowed]
    if foreign:
        what = "an ε/v model" if kind.objective == "diffusion" else "a flow-matching model"
        raise ValueError(f"train.{foreign[0]}={train[foreign[0]]!r} does not apply to {what} ({kind.pipeline_class}); "
                         f"its objective options: {', '.join(f'train.{n}' for n in allowed)}")
    if kind.objective == "diffusion":
        return Diffusion(pipeline.scheduler.config, snr_gamma=train.get("snr_gamma"),
                         noise_offset=train.get("noise_offset"))
    options = {name: train.get(name) if train.get(name) is not None else default
               for name, default in FLOW_DEFAULTS.items()}
    check_weighting_scheme(options["weighting_scheme"])
    return FlowMatching(pipeline.scheduler.config, **options)


def guidance_scale(pipeline, train: dict[str, Any]) -> float | None:
    """The guidance FLUX's transformer is told in training (None: it has no guidance embedding)."""
    from visionpeft.models.pipeline_kinds import denoiser

    if not getattr(denoiser(pipeline).config, "guidance_embeds", False):
        return None
    return float(train["guidance_scale"]) if train.get("guidance_scale") is not None else DEFAULT_GUIDANCE
