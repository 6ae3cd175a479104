"""Tiny SDXL, SD3 and FLUX pipelines built from configs (tests, demos, benchmarks; no downloads).

Each has the layout of the real model at toy width: the same component classes, text encoders, conditioning and
scheduler family, so everything that trains, saves, loads and samples them works on the full-size checkpoints too.

* ``tiny_stable_diffusion_xl``: two CLIP text encoders (the second with a projection, whose pooled output and the
  micro-conditioning time ids (original size, crop, target size) enter the UNet's ``text_time`` embedding), a UNet
  whose cross-attention reads both encoders' penultimate states side by side, DDPM (ε or v).
* ``tiny_stable_diffusion_3``: an MMDiT ``SD3Transformer2DModel``, two CLIP encoders with projection and a T5
  encoder, a flow-matching Euler scheduler with SD3's shift of 3. ``with_t5=False`` builds the reduced set the
  pipeline accepts (``text_encoder_3=None``: the T5 part of the prompt states is zeros).
* ``tiny_flux``: a ``FluxTransformer2DModel`` with the guidance embedding (FLUX.1-dev style), CLIP (pooled) and T5
  (sequence) encoders, 2×2-packed latents, FLUX's dynamically shifted flow-matching scheduler.

Tokenizers are generated: CLIP's from ``visionpeft.models.pipelines.tiny_tokenizer``, T5's as a Unigram vocabulary
of single characters, so any text encodes. Every pipeline saves with ``save_pretrained`` into a folder that
``DiffusionPipeline.from_pretrained`` and ``visionpeft train`` read like a hub checkout.
"""
from __future__ import annotations

import torch

from visionpeft.models.configs import diffusers_unet
from visionpeft.models.pipelines import PREDICTION_TYPES, _byte_alphabet, tiny_tokenizer

# the real models' VAE latent statistics (SD3 and FLUX latents are shifted, then scaled)
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}


def tiny_t5_tokenizer(max_length: int = 32):
    """A T5 tokenizer (Unigram, like sentencepiece's) whose vocabulary is every byte character, alone and after
    the word-start marker."""
    from transformers import T5Tokenizer

    alphabet = _byte_alphabet()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -4.0) for c in alphabet] + [("\u2581" + c, -3.0) for c in alphabet]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _evaluating(pipeline):
    """Every model component in eval mode, as ``from_pretrained`` leaves them."""
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipeline


def _check_size(image_size: int, multiple: int = 8) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 16 or image_size % multiple:
        raise ValueError(f"image_size={image_size!r} must be an int >= 16 divisible by {multiple}")


def _vae(image_size: int, latent_channels: int = 4, **config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=image_size, **config)


def _clip(tokenizer, width: int, *, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, projection_dim=width)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=width // 2, d_ff=2 * width,
                                   num_layers=2, num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   decoder_start_token_id=tokenizer.pad_token_id))


def tiny_stable_diffusion_xl(*, image_size: int = 32, prediction_type: str = "epsilon", seed: int = 0,
                             text_width: int = 32, max_length: int = 32):
    """A randomly initialised ``StableDiffusionXLPipeline`` at toy size (see the module docstring)."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    _check_size(image_size)
    tokenizer, tokenizer_2 = tiny_tokenizer(max_length), tiny_tokenizer(max_length)
    time_width = 8  # each of the 6 time ids gets a sinusoidal embedding of this width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = _vae(image_size, force_upcast=False)
        text_encoder = _clip(tokenizer, text_width, projection=False)
        text_encoder_2 = _clip(tokenizer_2, text_width, projection=True)
        unet, _ = diffusers_unet(sample_size=image_size // 2, cross_attention_dim=2 * text_width,
                                 addition_embed_type="text_time", addition_time_embed_dim=time_width,
                                 projection_class_embeddings_input_dim=6 * time_width + text_width,
                                 use_linear_projection=True)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              prediction_type=prediction_type, steps_offset=1, timestep_spacing="leading")
    return _evaluating(StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False))


def tiny_stable_diffusion_3(*, image_size: int = 32, seed: int = 0, text_width: int = 32, max_length: int = 32,
                            with_t5: bool = True):
    """A randomly initialised ``StableDiffusion3Pipeline`` at toy size (see the module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    _check_size(image_size)
    tokenizer, tokenizer_2 = tiny_tokenizer(max_length), tiny_tokenizer(max_length)
    tokenizer_3 = tiny_t5_tokenizer(max_length) if with_t5 else None
    joint_width = 2 * text_width  # the two CLIPs' states side by side, padded to the T5 width (equal here)
    heads, head_width = 2, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = _vae(image_size, use_quant_conv=False, use_post_quant_conv=False, force_upcast=False, **SD3_VAE)
        text_encoder = _clip(tokenizer, text_width, projection=True)
        text_encoder_2 = _clip(tokenizer_2, text_width, projection=True)
        text_encoder_3 = _t5(tokenizer_3, joint_width) if with_t5 else None
        transformer = SD3Transformer2DModel(
            sample_size=image_size // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=head_width, num_attention_heads=heads, joint_attention_dim=joint_width,
            caption_projection_dim=heads * head_width, pooled_projection_dim=2 * text_width,
            pos_embed_max_size=image_size // 2)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return _evaluating(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3))


def flux_transformer(*, width: int = 32, heads: int = 2, double_layers: int = 1, single_layers: int = 1,
                     text_width: int = 32, pooled_width: int = 32, latent_channels: int = 4, guidance: bool = True):
    """A ``FluxTransformer2DModel`` of width ``width`` (= heads × head width): FLUX.1's double-stream and
    single-stream blocks, rotary axes split as (1/8, 7/16, 7/16) of the head width as in FLUX.1."""
    from diffusers import FluxTransformer2DModel

    head_width = width // heads
    if head_width * heads != width or head_width % 16:
        raise ValueError(f"width={width!r} must be heads ({heads}) × a multiple of 16")
    spatial = (head_width - head_width // 8) // 2 // 2 * 2  # even rotary widths summing to the head width
    axes = (head_width - 2 * spatial, spatial, spatial)
    return FluxTransformer2DModel(patch_size=1, in_channels=4 * latent_channels, num_layers=double_layers,
                                  num_single_layers=single_layers, attention_head_dim=head_width,
                                  num_attention_heads=heads, joint_attention_dim=text_width,
                                  pooled_projection_dim=pooled_width, guidance_embeds=guidance, axes_dims_rope=axes)


def tiny_flux(*, image_size: int = 32, seed: int = 0, text_width: int = 32, max_length: int = 32,
              guidance: bool = True):
    """A randomly initialised ``FluxPipeline`` at toy size (see the module docstring). ``guidance=False`` builds
    a transformer without the guidance embedding (FLUX.1-schnell style)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    _check_size(image_size, 16)  # 2× VAE downsampling, then 2×2 packing
    tokenizer, tokenizer_2 = tiny_tokenizer(max_length), tiny_t5_tokenizer(max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = _vae(image_size, use_quant_conv=False, use_post_quant_conv=False, force_upcast=False, **FLUX_VAE)
        text_encoder = _clip(tokenizer, text_width, projection=False)
        text_encoder_2 = _t5(tokenizer_2, text_width)
        transformer = flux_transformer(width=32, text_width=text_width, pooled_width=text_width, guidance=guidance)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return _evaluating(FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer))


TINY_PIPELINES = {"sdxl": tiny_stable_diffusion_xl, "sd3": tiny_stable_diffusion_3, "flux": tiny_flux}
