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

    python benchmarks/dreambooth.py [--unet sd15-cpu] [--device cuda] [--repeats 3] [--out FILE]
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


def _take_unet_flag(argv: list[str]) -> list[str]:
    """Remove ``--unet NAME`` from the arguments (the harness does not know it) and export the choice."""
    rest, i = [], 0
    while i < len(argv):
        if argv[i] == "--unet" or argv[i].startswith("--unet="):
            value = argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "")
            if value not in UNETS:
                raise SystemExit(f"--unet {value!r} is unknown; choose from {', '.join(UNETS)}")
            os.environ[UNET_ENV] = value
            i += 1 if "=" in argv[i] else 2
            continue
        rest.append(argv[i])
        i += 1
    return rest


if __name__ == "__main__":
    arguments = _take_unet_flag(sys.argv[1:])
    main(CONFIGS, workloads(), floor="floor", peer="diffusers-peft-lora", argv=arguments)
