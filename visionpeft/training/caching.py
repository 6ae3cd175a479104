"""Caches of what the frozen VAE and text encoders compute, for DreamBooth (``data.cache_latents``,
``data.cache_text_embeddings``), kept in ``data.cache_dir`` (default ``<output>/cache``).

* Latents: the VAE's latent distribution (mean and log-variance) of every instance and class image, computed once;
  each step draws its latents from it, as diffusers' ``--cache_latents`` does. The crop is drawn once (with
  ``data.center_crop: false`` every epoch sees the same crop). Keyed by the model, the resolution, the crop mode and
  every image (name, size, modification time).
* Text embeddings: the prompt states of the instance (and class) prompt. Keyed by the model, the prompts and the T5
  sequence length. Only for frozen text encoders: an adapted one changes its states every step.

A cache recorded for another key is refused with what differs, as the class-image folder is; nothing is
overwritten. Files are written atomically, the tensors before the key that makes them valid.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset


def _read_key(index: Path) -> dict[str, Any] | None:
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(index)!r} is corrupt ({err}); remove it or use another data.cache_dir") from None


def _check_key(index: Path, key: dict[str, Any], what: str) -> bool:
    """True when ``index`` records ``key``; False when there is no cache yet; ValueError when it records another."""
    recorded = _read_key(index)
    if recorded is None:
        return False
    for name in key:
        if recorded.get(name) != key[name]:
            raise ValueError(f"the {what} cache in {str(index.parent)!r} was built for {name} {recorded.get(name)!r}, "
                             f"not {key[name]!r}; use another data.cache_dir or empty this one")
    return True


def _store(folder: Path, stem: str, tensors: dict[str, torch.Tensor], key: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from visionpeft.io import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(folder / f"{stem}.safetensors", lambda tmp: save_file(data, tmp))
    text = json.dumps(key, indent=1)
    atomic_write(folder / f"{stem}.json", lambda tmp: Path(tmp).write_text(text))


def _load(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / f"{stem}.safetensors")


def cached_text_embeddings(folder: str | os.PathLike, key: dict[str, Any],
                           compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The prompt states recorded under ``key`` (model, prompts, sequence length), computed once."""
    folder = Path(folder)
    if _check_key(folder / "text_embeddings.json", key, "text embedding"):
        return _load(folder, "text_embeddings")
    tensors = compute()
    _store(folder, "text_embeddings", tensors, key)
    return tensors


def image_identity(paths: list[Path]) -> list[list]:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def cached_latents(folder: str | os.PathLike, key: dict[str, Any], dataset,
                   encode: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per item of ``dataset`` (a ``DreamBoothImages``), the latent distribution parameters of its images and their
    micro-conditioning, stacked: ``{role}_latent_parameters``, ``{role}_original_size``, ``{role}_crop_top_left``."""
    folder = Path(folder)
    if _check_key(folder / "latents.json", key, "latent"):
        return _load(folder, "latents")
    items = [dataset[i] for i in range(len(dataset))]
    tensors: dict[str, torch.Tensor] = {}
    for role in ("instance", "class"):
        if role not in items[0]:
            continue
        with torch.no_grad():
            tensors[f"{role}_latent_parameters"] = torch.cat([encode(item[role][None]) for item in items]).float()
        for name in ("original_size", "crop_top_left"):
            tensors[f"{role}_{name}"] = torch.stack([item[f"{role}_{name}"] for item in items])
    _store(folder, "latents", tensors, key)
    return tensors


class CachedLatents(Dataset):
    """The items of a latent cache: ``instance_latent_parameters`` etc. (no pixels)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.length = tensors["instance_latent_parameters"].shape[0]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: value[index] for name, value in self.tensors.items()}


def sample_latents(vae, parameters: torch.Tensor) -> torch.Tensor:
    """A draw from a cached latent distribution, scaled (and shifted) as the pipeline's latents are."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from visionpeft.training.conditioning import scale_latents

    return scale_latents(vae, DiagonalGaussianDistribution(parameters).sample())


def batch_latents(batch: dict[str, torch.Tensor], vae, weight_dtype) -> tuple[torch.Tensor, dict, int]:
    """(latents, SDXL micro-conditioning, number of instance samples): instance samples first, then class samples,
    from the pixels through the frozen VAE or drawn from the cached latent distributions."""
    from visionpeft.training.conditioning import Conditioning

    cached = "instance_latent_parameters" in batch
    roles = ["instance"] + (["class"] if "class" in batch or "class_latent_parameters" in batch else [])
    parts, extras = [], {"original_size": [], "crop_top_left": []}
    with torch.no_grad():
        for role in roles:
            if cached:
                parts.append(sample_latents(vae, batch[f"{role}_latent_parameters"].to(vae.device, weight_dtype)))
            else:
                parts.append(Conditioning.latents(vae, batch[role].to(vae.device, weight_dtype)))
            for name in extras:
                extras[name].append(batch[f"{role}_{name}"])
    latents = torch.cat(parts)
    return latents, {name: torch.cat(values) for name, values in extras.items()}, parts[0].shape[0]


def cache_key(recipe: dict[str, Any]) -> dict[str, Any]:
    """What identifies the model a cache was built with."""
    model = recipe["model"]
    return {"pretrained": model["pretrained"], "revision": model["revision"], "variant": model["variant"]}


def latent_dataset(dataset, folder: Path, recipe, instance_images, class_images, vae, weight_dtype, accelerator):
    """The dataset as cached latent distributions (computed once by the main process, keyed by the model, the
    resolution, the crop and the images)."""
    key = cache_key(recipe) | {
        "resolution": recipe["data"]["resolution"], "center_crop": recipe["data"]["center_crop"],
        "instance_images": image_identity(instance_images), "class_images": image_identity(class_images or [])}

    def encode(pixels):
        return vae.encode(pixels.to(vae.device, weight_dtype)).latent_dist.parameters.cpu()

    if accelerator.is_main_process:
        cached_latents(folder, key, dataset, encode)
    accelerator.wait_for_everyone()
    return CachedLatents(cached_latents(folder, key, dataset, encode))


def text_embeddings(folder: Path, recipe, prompts, conditioning, encode, accelerator):
    """The prompt states, cached (keyed by the model, the prompts and the T5 length)."""
    key = cache_key(recipe) | {"prompts": prompts, "max_sequence_length": conditioning.t5_length}
    if accelerator.is_main_process:
        cached_text_embeddings(folder, key, encode)
    accelerator.wait_for_everyone()
    return {k: v.to(accelerator.device) for k, v in cached_text_embeddings(folder, key, encode).items()}
