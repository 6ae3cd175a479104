"""Diffusion pipelines: a tiny Stable Diffusion one built from configs (tests, demos; no downloads; the tiny SDXL, SD3
and FLUX ones are in ``visionpeft.models.tiny_pipelines``), loading any supported pipeline from a local directory or
a hub id, and sampling images. A pipeline's adapter folder (``save_pipeline_adapter``, ``apply_adapter``) is
``visionpeft.models.pipeline_adapters``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from visionpeft.models.configs import diffusers_unet

TEXT_ENCODER_ADAPTER = "text_encoder"
PREDICTION_TYPES = ("epsilon", "v_prediction")
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


# --- the tiny pipeline ----------------------------------------------------------------------------
def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (as in GPT-2 and CLIP)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted, chars = 0, []
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def write_tiny_tokenizer_files(directory: str | os.PathLike, max_length: int = 32) -> Path:
    """A character-level CLIP vocabulary (every byte, alone and word-final) with no merges: any text encodes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *SPECIAL_TOKENS]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))
    return directory


def tiny_tokenizer(max_length: int = 32):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_tiny_tokenizer_files(folder, max_length)
        return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


def tiny_stable_diffusion(*, image_size: int = 32, prediction_type: str = "epsilon", seed: int = 0,
                          text_width: int = 32, max_length: int = 32):
    """A randomly initialised ``StableDiffusionPipeline`` of the SD-1.x layout at toy size: VAE with a 2× latent
    downsampling, a two-level UNet with cross-attention, a 2-layer CLIP text encoder, a DDPM scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    if not isinstance(image_size, int) or image_size < 16 or image_size % 8:
        raise ValueError(f"image_size={image_size!r} must be an int >= 16 divisible by 8")
    tokenizer = tiny_tokenizer(max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                            latent_channels=4, norm_num_groups=8, sample_size=image_size)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=text_width))
        unet, _ = diffusers_unet(sample_size=image_size // 2, cross_attention_dim=text_width)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              prediction_type=prediction_type, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# --- loading, sampling --------------------------------------------------------------------------------
def load_pipeline(pretrained: str, *, dtype: torch.dtype | None = None, revision: str | None = None,
                  variant: str | None = None):
    """A supported pipeline (``visionpeft.models.pipeline_kinds.SUPPORTED``: SD-1.x/2.x, SDXL, SD3, FLUX) from a
    local directory (``save_pretrained``) or a hub id; SD's safety checker is not loaded. The class named by the
    folder's ``model_index.json`` is checked before any weight is read."""
    from diffusers import DiffusionPipeline

    from visionpeft.models.pipeline_kinds import kind_of

    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(f"pretrained={pretrained!r} must be a local pipeline directory or a hub id such as "
                         f"'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    local = Path(pretrained)
    if local.exists() and not (local / "model_index.json").is_file():
        raise ValueError(f"pretrained={pretrained!r} is a path but not a diffusers pipeline directory "
                         f"(no model_index.json)")
    kwargs: dict[str, Any] = {}
    if revision:
        kwargs["revision"] = revision
    if variant:
        kwargs["variant"] = variant
    try:
        index = DiffusionPipeline.load_config(pretrained, revision=revision)
        try:
            kind = kind_of(index.get("_class_name", "(none)"))
        except ValueError as err:
            raise ValueError(f"pretrained={pretrained!r}: {err}") from None
        if kind.name == "sd":
            kwargs |= {"safety_checker": None, "requires_safety_checker": False}
        pipeline = DiffusionPipeline.from_pretrained(pretrained, **kwargs)
    except OSError as err:
        if local.exists():
            raise
        raise FileNotFoundError(f"pretrained={pretrained!r} is neither a local pipeline directory nor a hub id that "
                                f"could be fetched ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    pipeline.set_progress_bar_config(disable=True)
    if dtype is not None:
        cast_pipeline(pipeline, dtype)
    return pipeline


def cast_pipeline(pipeline, dtype: torch.dtype):
    """Every model component of ``pipeline`` in ``dtype``, with ``nn.Module.to``. (diffusers renamed its loading
    keyword ``torch_dtype`` to ``dtype`` and deprecates the old name; casting after loading works on every release.)"""
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={dtype!r} must be a torch.dtype such as torch.float16")
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module) and any(p.dtype != dtype for p in component.parameters()):
            component.to(dtype=dtype)
    return pipeline


SAMPLERS = ("auto", "dpmsolver", "pipeline")


def sampling_scheduler(pipeline, name: str = "auto"):
    """The scheduler used for sampling: DPM-Solver++ multistep (DreamBooth's evaluation sampler) for ε/v pipelines,
    or the pipeline's own; ``auto`` is DPM-Solver++ for ε/v pipelines and the pipeline's own flow-matching
    scheduler for SD3 and FLUX."""
    from diffusers import DPMSolverMultistepScheduler

    from visionpeft.models.pipeline_kinds import kind_of

    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is unknown; allowed: {', '.join(SAMPLERS)}")
    kind = kind_of(pipeline)
    if name == "pipeline" or (name == "auto" and kind.objective == "flow"):
        return pipeline.scheduler
    if kind.objective == "flow":
        raise ValueError(f"sampler 'dpmsolver' is for ε/v pipelines; a {kind.pipeline_class} samples with its own "
                         f"flow-matching scheduler (allowed: auto, pipeline)")
    return DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)


@torch.no_grad()
def generate(pipeline, prompts: Sequence[str], *, images_per_prompt: int = 1, steps: int = 25,
             guidance_scale: float = 7.5, seed: int = 0, size: int | None = None, batch_size: int = 4,
             sampler: str = "auto", progress: bool = False) -> list:
    """PIL images, ``images_per_prompt`` per prompt in prompt order, reproducible from ``seed``. ``guidance_scale``
    is classifier-free guidance, except on FLUX, whose transformer embeds it. ``progress``: a bar over the images."""
    from tqdm.auto import tqdm

    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts={prompts!r} must be a non-empty list of strings")
    for key, value in (("images_per_prompt", images_per_prompt), ("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key}={value!r} must be an int >= 1")
    size = _image_size(pipeline, size)
    original = pipeline.scheduler
    pipeline.scheduler = sampling_scheduler(pipeline, sampler)
    wanted = [p for p in prompts for _ in range(images_per_prompt)]
    images = []
    bar = tqdm(total=len(wanted), desc="generate", unit="img", disable=not progress)
    try:
        for start in range(0, len(wanted), batch_size):
            chunk = wanted[start:start + batch_size]
            generators = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
            result = pipeline(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, height=size, width=size,
                              generator=generators, output_type="pil")
            images.extend(result.images)
            bar.update(len(chunk))
    finally:
        pipeline.scheduler = original
        bar.close()
    return images


def _image_size(pipeline, size: int | None) -> int:
    """The side of the generated images: the pipeline's own default (denoiser sample size × VAE factor) for None."""
    from visionpeft.models.pipeline_kinds import denoiser

    # FLUX packs 2×2 latent patches: its side must be a multiple of twice the VAE factor
    multiple = 2 * pipeline.vae_scale_factor if type(pipeline).__name__ == "FluxPipeline" else 8
    if size is None:
        sample = getattr(denoiser(pipeline).config, "sample_size", None) or pipeline.default_sample_size
        return sample * pipeline.vae_scale_factor
    if not isinstance(size, int) or isinstance(size, bool) or size < multiple or size % multiple:
        raise ValueError(f"size={size!r} must be a positive multiple of {multiple} for a {type(pipeline).__name__} "
                         f"(or None for the pipeline's own size)")
    return size


def image_grid(images: Sequence, columns: int):
    """One image with ``images`` tiled row by row, ``columns`` per row."""
    from PIL import Image

    if not images:
        raise ValueError("image_grid needs at least one image")
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def save_image(image, path: str | os.PathLike) -> Path:
    """PNG written atomically (``visionpeft.io.atomic_write``), so a reader never sees a partial image."""
    from visionpeft.io import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# the pipeline's adapter folder (re-exported: its home is visionpeft.models.pipeline_adapters)
from visionpeft.models.pipeline_adapters import (  # noqa: E402
    ADAPTER_ENTRIES, apply_adapter, has_text_encoder_adapter, save_pipeline_adapter,
)
