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


def image_batch(device, batch: int = 8, size: int = 224, classes: int = 10):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 3, size, size, generator=g).to(device),
            torch.randint(0, classes, (batch,), generator=g).to(device))


def classification_loss(model, inputs, target):
    return _regularized(F.cross_entropy(model(inputs), target), model)


def sd_unet():
    """``visionpeft.models.configs.sd15_like_unet``: SD-1.5's block structure at CPU size (35M parameters)."""
    from visionpeft.models.configs import sd15_like_unet

    return sd15_like_unet()[0]


def sd15_unet():
    """SD-1.5's UNet at its real width (860M parameters: channels 320-1280, cross-attention width 768)."""
    from visionpeft.models.configs import sd15_like_unet

    return sd15_like_unet(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, sample_size=16)[0]


def sd15_unet_batch(device):
    """One 16×16 latent (a 128 px image), the size a 2-core CPU steps in seconds; SD-1.5 trains at 64×64."""
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(1, 4, 16, 16, generator=g), "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, 77, 768, generator=g)}
    return {k: v.to(device) for k, v in inputs.items()}, torch.randn(1, 4, 16, 16, generator=g).to(device)


def unet_batch(device):
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, 32, 32, generator=g), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(2, 77, 256, generator=g)}
    return {k: v.to(device) for k, v in inputs.items()}, torch.randn(2, 4, 32, 32, generator=g).to(device)


def noise_loss(model, inputs, target):
    return _regularized(F.mse_loss(model(**inputs).sample, target), model)
