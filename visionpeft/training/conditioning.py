"""How each pipeline kind conditions its denoiser in training: prompt encoding with the (possibly adapted) text
encoders, the latents its VAE gives, and one denoiser call in the latent layout. Each follows the pipeline's own
``encode_prompt`` and diffusers' DreamBooth script for it:

* SD-1.x/2.x: the CLIP encoder's last hidden states.
* SDXL: both CLIP encoders' penultimate hidden states side by side, the second's projected pooled output, and the
  micro-conditioning ``add_time_ids`` = (original height, width, crop top, left, target height, width) per sample.
* SD3: both CLIPs' penultimate states side by side, zero-padded to the T5 width and followed by the T5 states
  (zeros when the pipeline has no T5), and both CLIPs' pooled projections; the transformer gets the timesteps.
* FLUX: CLIP's pooled output and the T5 states; latents packed into 2×2 patches with their position ids, the
  timestep as a fraction of 1000, and the guidance scale where the transformer embeds one.

Text states are computed per prompt (a row per prompt); ``rows`` picks each sample's prompt.
"""
from __future__ import annotations

import torch

#: the T5 sequence length when the recipe sets none: diffusers' SD3 script's 77, FLUX's 512
T5_LENGTH = {"sd3": 77, "flux": 512}


def _ids(tokenizer, prompts: list[str], length: int, device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def _clip_length(tokenizer) -> int:
    return tokenizer.model_max_length


class Conditioning:
    """One pipeline's prompt encoding and denoiser call (SD-1.x/2.x; the subclasses override what differs)."""

    def __init__(self, pipeline, *, max_sequence_length: int | None = None, guidance_scale: float | None = None):
        from visionpeft.models.pipeline_kinds import kind_of

        self.kind = kind_of(pipeline)
        self.tokenizers = {name: getattr(pipeline, name.replace("text_encoder", "tokenizer"))
                           for name in self.kind.text_encoders}
        self.vae_scale_factor = pipeline.vae_scale_factor
        self.guidance_scale = guidance_scale
        length = max_sequence_length or T5_LENGTH.get(self.kind.name, 77)
        t5 = self.tokenizers.get("text_encoder_3" if self.kind.name == "sd3" else "text_encoder_2")
        if t5 is not None and self.kind.objective == "flow" and 0 < t5.model_max_length < length:
            length = t5.model_max_length  # a tokenizer's own limit (real T5s: 512)
        self.t5_length = length

    def encode(self, prompts: list[str], encoders: dict, device) -> dict[str, torch.Tensor]:
        ids = _ids(self.tokenizers["text_encoder"], prompts, _clip_length(self.tokenizers["text_encoder"]), device)
        return {"prompt_embeds": encoders["text_encoder"](ids)[0]}

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, batch: dict) -> torch.Tensor:
        return denoiser(noisy, timesteps, cond["prompt_embeds"]).sample

    @staticmethod
    def latents(vae, pixels: torch.Tensor) -> torch.Tensor:
        return scale_latents(vae, vae.encode(pixels).latent_dist.sample())


def scale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """(latents − shift) · scale, as the pipeline undoes before decoding (SD3 and FLUX VAEs have a shift)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


def _clip_states(encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states, pooled output: the projection where the model has one)."""
    out = encoder(ids, output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return out.hidden_states[-2], pooled


class XLConditioning(Conditioning):
    def encode(self, prompts, encoders, device):
        states, pooled = [], None
        for name in ("text_encoder", "text_encoder_2"):
            tokenizer = self.tokenizers[name]
            hidden, pooled = _clip_states(encoders[name], _ids(tokenizer, prompts, _clip_length(tokenizer), device))
            states.append(hidden)
        return {"prompt_embeds": torch.cat(states, dim=-1), "pooled_prompt_embeds": pooled}

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        target = torch.tensor([noisy.shape[-2] * self.vae_scale_factor, noisy.shape[-1] * self.vae_scale_factor])
        time_ids = torch.cat([batch["original_size"].float(), batch["crop_top_left"].float(),
                              target.float().expand(noisy.shape[0], 2)], dim=1)
        dtype = cond["prompt_embeds"].dtype
        extra = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": time_ids.to(noisy.device, dtype)}
        return denoiser(noisy, timesteps, cond["prompt_embeds"], added_cond_kwargs=extra).sample


class SD3Conditioning(Conditioning):
    def __init__(self, pipeline, **kw):
        super().__init__(pipeline, **kw)
        self.joint_width = pipeline.transformer.config.joint_attention_dim

    def encode(self, prompts, encoders, device):
        states, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):
            tokenizer = self.tokenizers[name]
            hidden, pool = _clip_states(encoders[name], _ids(tokenizer, prompts, _clip_length(tokenizer), device))
            states.append(hidden)
            pooled.append(pool)
        clip = torch.cat(states, dim=-1)
        if encoders.get("text_encoder_3") is not None:
            t5 = encoders["text_encoder_3"](_ids(self.tokenizers["text_encoder_3"], prompts, self.t5_length,
                                                 device))[0]
        else:  # the reduced set: the pipeline's zeros in place of the T5 states
            t5 = clip.new_zeros(len(prompts), _clip_length(self.tokenizers["text_encoder"]), self.joint_width)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["prompt_embeds"],
                        pooled_projections=cond["pooled_prompt_embeds"]).sample


class FluxConditioning(Conditioning):
    def __init__(self, pipeline, **kw):
        super().__init__(pipeline, **kw)
        from visionpeft.training.objectives import DEFAULT_GUIDANCE

        # a transformer with the guidance embedding must be told one; one without it is never told any
        if not pipeline.transformer.config.guidance_embeds:
            self.guidance_scale = None
        elif self.guidance_scale is None:
            self.guidance_scale = DEFAULT_GUIDANCE

    def encode(self, prompts, encoders, device):
        clip_tokenizer = self.tokenizers["text_encoder"]
        pooled = encoders["text_encoder"](_ids(clip_tokenizer, prompts, _clip_length(clip_tokenizer), device)).pooler_output
        t5 = encoders["text_encoder_2"](_ids(self.tokenizers["text_encoder_2"], prompts, self.t5_length, device))[0]
        return {"prompt_embeds": t5, "pooled_prompt_embeds": pooled}

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if self.guidance_scale is not None:
            guidance = torch.full((b,), float(self.guidance_scale), device=noisy.device, dtype=torch.float32)
        out = denoiser(hidden_states=packed, timestep=timesteps.to(noisy.dtype) / 1000, guidance=guidance,
                       pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=cond["prompt_embeds"],
                       txt_ids=text_ids, img_ids=image_ids).sample
        return FluxPipeline._unpack_latents(out, height=h * self.vae_scale_factor, width=w * self.vae_scale_factor,
                                            vae_scale_factor=self.vae_scale_factor)


CONDITIONINGS = {"sd": Conditioning, "sdxl": XLConditioning, "sd3": SD3Conditioning, "flux": FluxConditioning}


def conditioning_for(pipeline, **options) -> Conditioning:
    from visionpeft.models.pipeline_kinds import kind_of

    return CONDITIONINGS[kind_of(pipeline).name](pipeline, **options)


def rows(cond: dict[str, torch.Tensor], n_instance: int, n_total: int) -> dict[str, torch.Tensor]:
    """Each sample's prompt states: the first ``n_instance`` get prompt 0 (the instance prompt), the rest prompt 1
    (the class prompt)."""
    if n_total > n_instance and next(iter(cond.values())).shape[0] < 2:
        raise ValueError(f"the batch has class images but the prompt states hold "
                         f"{next(iter(cond.values())).shape[0]} prompt(s); need the instance and the class prompt")
    index = torch.tensor([0] * n_instance + [1] * (n_total - n_instance))
    return {name: value[index.to(value.device)] for name, value in cond.items()}
