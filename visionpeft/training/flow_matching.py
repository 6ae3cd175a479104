"""Rectified-flow (flow-matching) training of SD3 and FLUX, as diffusers' ``train_dreambooth_lora_sd3.py`` and
``train_dreambooth_lora_flux.py`` do it.

A latent x and noise n give the point x_σ = (1 − σ)·x + σ·n on the straight path between them; the denoiser learns
the velocity n − x. The training timesteps are drawn through ``u`` ∈ [0, 1), index ⌊u·1000⌋ into the training
scheduler's timesteps and sigmas (``FlowMatchEulerDiscreteScheduler`` from the pipeline's scheduler config, so
SD3's static shift of 3 is in the sigmas; FLUX shifts dynamically at sampling only). ``weighting_scheme``:

* ``logit_normal``: u = sigmoid(N(logit_mean, logit_std²)) (SD3's paper, diffusers' SD3 default), unit loss weights;
* ``mode``: u = 1 − v − mode_scale·(cos²(πv/2) − 1 + v), v uniform (mode sampling with heavy tails);
* ``sigma_sqrt``: u uniform, loss weight σ⁻²;
* ``cosmap``: u uniform, loss weight 2 / (π·(1 − 2σ + 2σ²));
* ``none``: u uniform, unit weights (diffusers' FLUX default).

The sampling and weighting functions are diffusers' own (``diffusers.training_utils``). diffusers' SD3 script also
offers EDM-style output preconditioning; here the target is always noise − latents, as FLUX's script has it.
"""
from __future__ import annotations

import dataclasses

import torch

WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")
#: recipe train.* keys that only a flow-matching model reads, with the value each gets when left null
FLOW_DEFAULTS = {"weighting_scheme": "none", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}


@dataclasses.dataclass
class NoisedBatch:
    """One noised training batch: the denoiser's input, what it learns to predict, the timesteps it is told, and a
    loss weight per sample (None: all 1)."""

    noisy: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    weights: torch.Tensor | None = None


def check_weighting_scheme(scheme: str) -> str:
    if scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"train.weighting_scheme={scheme!r} is unknown; allowed: {', '.join(WEIGHTING_SCHEMES)}")
    return scheme


class FlowMatching:
    """Samples noised batches of the rectified flow for a pipeline's scheduler config."""

    kind = "flow_matching"

    def __init__(self, scheduler_config, *, weighting_scheme: str = "none", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.weighting_scheme = check_weighting_scheme(weighting_scheme)
        if logit_std <= 0:
            raise ValueError(f"train.logit_std={logit_std!r} must be > 0")
        self.logit_mean, self.logit_std, self.mode_scale = float(logit_mean), float(logit_std), float(mode_scale)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def sample_sigmas(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas) of ``batch`` samples drawn by the weighting scheme."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting_scheme, batch, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale,
                                                  generator=generator)
        steps = self.scheduler.config.num_train_timesteps
        # "mode" maps u = 0 to 1.0; the last index is the nearest schedule point
        indices = (u * steps).long().clamp(0, len(self.scheduler.timesteps) - 1)
        return self.scheduler.timesteps[indices], self.scheduler.sigmas[indices]

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor | None:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if self.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        return compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas).float()

    def noised(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> NoisedBatch:
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        timesteps, sigmas = self.sample_sigmas(latents.shape[0], generator)
        sigma = sigmas.to(latents.device, latents.dtype).view(-1, *(1,) * (latents.dim() - 1))
        noisy = (1.0 - sigma) * latents + sigma * noise
        weights = self.loss_weights(sigmas)
        return NoisedBatch(noisy, noise - latents, timesteps.to(latents.device),
                           None if weights is None else weights.to(latents.device))
