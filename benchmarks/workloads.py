"""Models, batches and losses shared by the benchmark scripts (random weights: no download).

Losses add ``vp.regularization(model)`` (zero for methods without a penalty), so a method that has one
(SaRA) pays for it in its step time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _regularized(loss, model):
    import visionpeft as vp

    return loss + vp.regularization(model)


def vit_s16():
    import timm

    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10)


def vit_b16():
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)


def image_batch(device, batch: int = 8, size: int = 224, classes: int = 10):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 3, size, size, generator=g).to(device),
            torch.randint(0, classes, (batch,), generator=g).to(device))


def classification_loss(model, inputs, target):
    return _regularized(F.cross_entropy(model(inputs), target), model)


def sd_unet(**kw):
    """``visionpeft.models.configs.sd15_like_unet``: SD-1.5's block structure, at CPU size by default (35M
    parameters); ``kw`` overrides the config."""
    from visionpeft.models.configs import sd15_like_unet

    return sd15_like_unet(**kw)[0]


def sd15_unet():
    """SD-1.5's UNet at its real width (860M parameters: channels 320-1280, cross-attention width 768)."""
    return sd_unet(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, sample_size=16)


def unet_batch(device, size: int = 32, text_width: int = 256, timesteps: tuple[int, ...] = (10, 500)):
    """Noisy latents (one per timestep), 77 text tokens and the noise target; fixed seed."""
    g = torch.Generator().manual_seed(0)
    batch = len(timesteps)
    inputs = {"sample": torch.randn(batch, 4, size, size, generator=g), "timestep": torch.tensor(timesteps),
              "encoder_hidden_states": torch.randn(batch, 77, text_width, generator=g)}
    return {k: v.to(device) for k, v in inputs.items()}, torch.randn(batch, 4, size, size, generator=g).to(device)


def sd15_unet_batch(device):
    """One 16×16 latent (a 128 px image), the size a 2-core CPU steps in seconds; SD-1.5 trains at 64×64."""
    return unet_batch(device, size=16, text_width=768, timesteps=(500,))


def noise_loss(model, inputs, target):
    return _regularized(F.mse_loss(model(**inputs).sample, target), model)


def peft_adapter(model, names, rank, head=(), dora=False):
    """HF PEFT's LoRA (or its DoRA, ``use_dora``) at ``rank`` (alpha = rank) on the modules ``names``; only its
    factors (and magnitudes) and the modules ``head`` train."""
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=names, use_dora=dora), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    modules = dict(model.named_modules())
    for name in head:
        modules[name].requires_grad_(True)
    return model
