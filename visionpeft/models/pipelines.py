"""Stable Diffusion pipelines: a tiny one built from configs (tests, demos; no downloads), loading one from a
local directory or a hub id, applying a saved visionpeft adapter, and sampling images.

A saved pipeline adapter is a ``vp.save`` directory for the UNet, with the text encoder's adapter (when
one was trained) in its subfolder ``text_encoder/``. It is written into a staging folder that replaces the target
folder as a whole, and applied all or nothing (the UNet's adapter is removed again when the text encoder's fails).
"""
from __future__ import annotations

import json
import os
import shutil
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


# --- loading, adapters, sampling ---------------------------------------------------------------------
def load_pipeline(pretrained: str, *, dtype: torch.dtype | None = None, revision: str | None = None,
                  variant: str | None = None):
    """A ``StableDiffusionPipeline`` from a local directory (``save_pretrained``) or a hub id, with no safety checker."""
    from diffusers import StableDiffusionPipeline

    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(f"pretrained={pretrained!r} must be a local pipeline directory or a hub id such as "
                         f"'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    local = Path(pretrained)
    if local.exists() and not (local / "model_index.json").is_file():
        raise ValueError(f"pretrained={pretrained!r} is a path but not a diffusers pipeline directory "
                         f"(no model_index.json)")
    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    if revision:
        kwargs["revision"] = revision
    if variant:
        kwargs["variant"] = variant
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(pretrained, **kwargs)
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
        if isinstance(component, torch.nn.Module):
            component.to(dtype=dtype)
    return pipeline


def has_text_encoder_adapter(directory: str | os.PathLike) -> bool:
    return (Path(directory) / TEXT_ENCODER_ADAPTER / "adapter.json").is_file()


def save_pipeline_adapter(pipeline_or_unet, directory: str | os.PathLike, text_encoder=None) -> Path:
    """``vp.save`` of the UNet into ``directory`` and of the text encoder (if adapted) into ``directory/text_encoder``.

    Both are written into a staging folder that then replaces ``directory`` as a whole, so nothing of an earlier
    adapter saved there (e.g. its ``text_encoder/``) survives. An existing ``directory`` is replaced only when it
    is empty or holds a saved pipeline adapter."""
    from visionpeft.core import records

    unet = getattr(pipeline_or_unet, "unet", pipeline_or_unet)
    text_encoder = text_encoder if text_encoder is not None else getattr(pipeline_or_unet, "text_encoder", None)
    directory = Path(directory)
    _check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".staging", dir=directory.parent))
    try:
        _save_adapters(unet, text_encoder if text_encoder is not None and records(text_encoder) else None, staging)
        _replace_folder(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


ADAPTER_ENTRIES = ("adapter.json", "adapter.safetensors", TEXT_ENCODER_ADAPTER)


def _check_replaceable(directory: Path) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"cannot save the pipeline adapter into {str(directory)!r}: it exists and is not a folder")
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in ADAPTER_ENTRIES and not p.name.startswith("."))
    if foreign:
        raise ValueError(f"cannot save the pipeline adapter into {str(directory)!r}: it holds {foreign[:5]}, which is "
                         f"not a saved adapter (allowed: an empty folder or one with {', '.join(ADAPTER_ENTRIES)})")


def _save_adapters(unet, text_encoder, folder: Path) -> None:
    import visionpeft as vp

    vp.save(unet, folder)
    if text_encoder is not None:
        vp.save(text_encoder, folder / TEXT_ENCODER_ADAPTER)


def _replace_folder(staging: Path, directory: Path) -> None:
    """Rename ``staging`` onto ``directory``; an existing ``directory`` is moved aside first and removed after."""
    old = None
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
        os.replace(directory, old / directory.name)
    try:
        os.replace(staging, directory)
    except BaseException:
        if old is not None:
            os.replace(old / directory.name, directory)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def apply_adapter(pipeline, directory: str | os.PathLike, *, merge: bool = False, scale: float = 1.0):
    """Load a saved pipeline adapter into ``pipeline`` (``vp.load``). ``scale`` is the adapter strength; any strength
    other than 1 is applied by merging (``vp.merge(model, scale)``), as is ``merge=True``. Returns ``pipeline``.
    All or nothing: when the text encoder's adapter cannot be loaded, the UNet's is removed again."""
    import visionpeft as vp
    from visionpeft.io import read_config

    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"scale={scale!r} must be a number (1.0: the adapter as trained)")
    read_config(directory)  # both configs are checked before either model changes
    with_text = has_text_encoder_adapter(directory)
    if with_text:
        read_config(Path(directory) / TEXT_ENCODER_ADAPTER)
    models = [pipeline.unet] + ([pipeline.text_encoder] if with_text else [])
    from visionpeft.core import adapters_rolled_back_on_error

    with adapters_rolled_back_on_error(*models):
        vp.load(pipeline.unet, directory)
        if with_text:
            vp.load(pipeline.text_encoder, Path(directory) / TEXT_ENCODER_ADAPTER)
    if merge or scale != 1.0:
        for model in models:
            vp.merge(model, float(scale))
    return pipeline


def sampling_scheduler(pipeline, name: str = "dpmsolver"):
    """The scheduler used for sampling: DPM-Solver++ multistep (DreamBooth's evaluation sampler) or the pipeline's own."""
    from diffusers import DPMSolverMultistepScheduler

    if name == "pipeline":
        return pipeline.scheduler
    if name == "dpmsolver":
        return DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    raise ValueError(f"sampler {name!r} is unknown; allowed: dpmsolver, pipeline")


@torch.no_grad()
def generate(pipeline, prompts: Sequence[str], *, images_per_prompt: int = 1, steps: int = 25,
             guidance_scale: float = 7.5, seed: int = 0, size: int | None = None, batch_size: int = 4,
             sampler: str = "dpmsolver") -> list:
    """PIL images, ``images_per_prompt`` per prompt in prompt order, reproducible from ``seed``."""
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
    try:
        for start in range(0, len(wanted), batch_size):
            chunk = wanted[start:start + batch_size]
            generators = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
            result = pipeline(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, height=size, width=size,
                              generator=generators, output_type="pil")
            images.extend(result.images)
    finally:
        pipeline.scheduler = original
    return images


def _image_size(pipeline, size: int | None) -> int:
    """The side of the generated images: the pipeline's own (UNet sample size × VAE factor) for None."""
    if size is None:
        return pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    if not isinstance(size, int) or isinstance(size, bool) or size < 8 or size % 8:
        raise ValueError(f"size={size!r} must be a positive multiple of 8 (or None for the pipeline's own size)")
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
