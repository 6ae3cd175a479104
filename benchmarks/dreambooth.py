"""DreamBooth training step (UNet: MSE on the noise, batch 2, text states of 77 tokens): step time and peak memory of
every method's DreamBooth recipe (``recipes/dreambooth/<method>.yaml``: its options and targets) against the frozen
floor, with diffusers' own PEFT-based LoRA (``unet.add_adapter(LoraConfig(...))``, rank 4 on to_q/k/v/out.0, as
``train_dreambooth_lora.py``) as the peer.

Configurations: ``floor`` (trunk frozen, activation gradients only; conv_in's bias trains so they flow), ``full``,
``diffusers-peft-lora``, ``visionpeft-lora`` (the same placement and rank as the peer), and ``flora``, ``snella``,
``sara``, ``svd`` with their recipe settings. ``--unet`` picks the UNet (each configuration builds it in its own
process):

* ``sd15-cpu`` (default): ``visionpeft.models.configs.sd15_like_unet()``, SD-1.5's block structure scaled for a
  2-core CPU, 32×32 latents;
* ``sd15``: SD-1.5's real shape (320/640/1280/1280 channels, 768-wide text states, 64×64 latents): for a GPU;
* ``tiny``: a two-level toy UNet, to check that the script runs (``--unet tiny --steps 1 --warmup 0 --repeats 1``).

``--model flux`` measures a FLUX.1-structured transformer (double- and single-stream blocks, 128-wide heads, packed
latents, the guidance embedding) at batch 1: ``floor``, ``diffusers-peft-lora`` (PEFT's LoRA through
``transformer.add_adapter``, rank 4 on ``train_dreambooth_lora_flux.py``'s default targets, the peer) and
``visionpeft-lora`` (the same layers and rank). ``--size``: ``cpu`` (default: width 384, 4 + 8 blocks, 256 image
and 64 text tokens), ``full`` (FLUX.1-dev's 12B shape at 512 px: for a GPU), ``tiny`` (a smoke test).

    python benchmarks/dreambooth.py [--unet sd15-cpu] [--device cuda] [--repeats 3] [--out FILE]
    python benchmarks/dreambooth.py --model flux [--size cpu] [--repeats 3] [--out FILE]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import Workload, frozen_floor, main  # noqa: E402
from workloads import noise_loss  # noqa: E402
from workloads import unet_batch as latent_batch  # noqa: E402

UNET_ENV = "VISIONPEFT_BENCH_UNET"  # children inherit the choice through the environment
UNETS = {
    "sd15-cpu": {},
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, sample_size=64),
    "tiny": dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=32,
                 norm_num_groups=8, sample_size=16),
}
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "dreambooth"
PEER_RANK = 4
PEER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _unet_choice() -> str:
    return os.environ.get(UNET_ENV, "sd15-cpu")


def build_unet():
    from visionpeft.models.configs import sd15_like_unet

    return sd15_like_unet(**UNETS[_unet_choice()])[0]


def unet_batch(device):
    config = build_unet_config()
    return latent_batch(device, size=config.sample_size, text_width=config.cross_attention_dim)


def build_unet_config():
    """The chosen UNet's config, read from the model itself (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return build_unet().config


def full(model, workload):
    return model


def diffusers_peft_lora(model, workload):
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=PEER_RANK, lora_alpha=PEER_RANK, init_lora_weights="gaussian",
                                 target_modules=PEER_TARGETS))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def visionpeft_lora(model, workload):
    import visionpeft as vp

    return vp.attach(model, "lora", targets=PEER_TARGETS, rank=PEER_RANK)


def from_recipe(method: str):
    """The adapter of ``recipes/dreambooth/<method>.yaml`` (its options and targets)."""
    def setup(model, workload):
        import visionpeft as vp
        from visionpeft.training.dreambooth import load_recipe

        adapter = load_recipe(RECIPES / f"{method}.yaml")["adapter"]
        return vp.attach(model, adapter["method"], targets=adapter["targets"], **adapter["options"])

    return setup


CONFIGS = {"floor": frozen_floor, "full": full, "diffusers-peft-lora": diffusers_peft_lora,
           "visionpeft-lora": visionpeft_lora, **{m: from_recipe(m) for m in ("flora", "snella", "sara", "svd")}}


def workloads() -> dict[str, Workload]:
    choice = _unet_choice()
    config = build_unet_config()
    title = (f"DreamBooth step, {choice} UNet, {config.sample_size}×{config.sample_size} latents, batch 2, "
             f"recipe settings per method")
    return {"unet": Workload(title, build_unet, unet_batch, noise_loss, floor_params=lambda m: [m.conv_in.bias])}


# --- FLUX: a FLUX.1-structured transformer, our LoRA against PEFT's on diffusers' FLUX DreamBooth targets ---------
MODEL_ENV, SIZE_ENV = "VISIONPEFT_BENCH_MODEL", "VISIONPEFT_BENCH_SIZE"
#: FLUX.1's layout (double-stream then single-stream blocks, 128-wide heads, 16 latent channels packed 2×2, the
#: guidance embedding) at three sizes; tokens = (latent side / 2)² image tokens + the T5 tokens
FLUX_SIZES = {
    "tiny": dict(width=32, heads=2, double_layers=1, single_layers=1, text_width=32, pooled_width=32, latent=8,
                 text_tokens=8),
    "cpu": dict(width=384, heads=3, double_layers=4, single_layers=8, text_width=512, pooled_width=256, latent=32,
                text_tokens=64),
    "full": dict(width=3072, heads=24, double_layers=19, single_layers=38, text_width=4096, pooled_width=768,
                 latent=64, text_tokens=512),
}
#: ``train_dreambooth_lora_flux.py``'s default ``target_modules`` (rank 4, alpha = rank, Gaussian init)
FLUX_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2"]
LATENT_CHANNELS = 16


def _flux_size() -> dict:
    return FLUX_SIZES[os.environ.get(SIZE_ENV, "cpu")]


def build_flux():
    from visionpeft.models.tiny_pipelines import flux_transformer

    size = _flux_size()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return flux_transformer(width=size["width"], heads=size["heads"], double_layers=size["double_layers"],
                                single_layers=size["single_layers"], text_width=size["text_width"],
                                pooled_width=size["pooled_width"], latent_channels=LATENT_CHANNELS)


def flux_batch(device):
    """One image (batch 1) as the FLUX pipeline feeds it: packed latents with their position ids, T5 states, the
    pooled CLIP vector, the timestep as a fraction and the guidance; the target has the packed latents' shape."""
    from diffusers import FluxPipeline

    size = _flux_size()
    g = torch.Generator().manual_seed(0)
    side = size["latent"]
    latents = torch.randn(1, LATENT_CHANNELS, side, side, generator=g)
    packed = FluxPipeline._pack_latents(latents, 1, LATENT_CHANNELS, side, side)
    inputs = {"hidden_states": packed,
              "encoder_hidden_states": torch.randn(1, size["text_tokens"], size["text_width"], generator=g),
              "pooled_projections": torch.randn(1, size["pooled_width"], generator=g),
              "timestep": torch.tensor([0.6]), "guidance": torch.tensor([3.5]),
              "img_ids": FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, "cpu", torch.float32),
              "txt_ids": torch.zeros(size["text_tokens"], 3)}
    return {k: v.to(device) for k, v in inputs.items()}, torch.randn(packed.shape, generator=g).to(device)


def flux_peft_lora(model, workload):
    """diffusers' route: ``transformer.add_adapter(LoraConfig(...))`` as the FLUX DreamBooth script calls it."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=PEER_RANK, lora_alpha=PEER_RANK, init_lora_weights="gaussian",
                                 target_modules=FLUX_TARGETS))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def flux_visionpeft_lora(model, workload):
    import visionpeft as vp

    return vp.attach(model, "lora", targets=FLUX_TARGETS, rank=PEER_RANK)


FLUX_CONFIGS = {"floor": frozen_floor, "diffusers-peft-lora": flux_peft_lora, "visionpeft-lora": flux_visionpeft_lora}


def flux_workloads() -> dict[str, Workload]:
    name = os.environ.get(SIZE_ENV, "cpu")
    size = _flux_size()
    tokens = (size["latent"] // 2) ** 2
    title = (f"FLUX DreamBooth step, {name} FLUX.1-structured transformer (width {size['width']}, "
             f"{size['double_layers']} double + {size['single_layers']} single blocks), batch 1, {tokens} image + "
             f"{size['text_tokens']} text tokens, LoRA rank {PEER_RANK} on diffusers' FLUX targets")
    return {"flux": Workload(title, build_flux, flux_batch, noise_loss, floor_params=lambda m: [m.x_embedder.bias])}


def _take_flag(argv: list[str], flag: str, choices, env: str) -> list[str]:
    """Remove ``flag NAME`` from the arguments (the harness does not know it) and export the choice, so the child
    processes build the same model."""
    rest, i = [], 0
    while i < len(argv):
        if argv[i] == flag or argv[i].startswith(flag + "="):
            value = argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "")
            if value not in choices:
                raise SystemExit(f"{flag} {value!r} is unknown; choose from {', '.join(choices)}")
            os.environ[env] = value
            i += 1 if "=" in argv[i] else 2
            continue
        rest.append(argv[i])
        i += 1
    return rest


if __name__ == "__main__":
    arguments = _take_flag(sys.argv[1:], "--unet", UNETS, UNET_ENV)
    arguments = _take_flag(arguments, "--model", ("unet", "flux"), MODEL_ENV)
    arguments = _take_flag(arguments, "--size", FLUX_SIZES, SIZE_ENV)
    if os.environ.get(MODEL_ENV, "unet") == "flux":
        main(FLUX_CONFIGS, flux_workloads(), floor="floor", peer="diffusers-peft-lora", argv=arguments)
    else:
        main(CONFIGS, workloads(), floor="floor", peer="diffusers-peft-lora", argv=arguments)
