"""Training-step time and peak memory of LoRA on a timm ViT-S/16 (224 px, batch 8) against HF PEFT.

Configurations: the frozen floor (trunk frozen, only ``pos_embed`` and the head trainable: activation
gradients flow through every block, no weight gradients), full fine-tuning, HF PEFT LoRA r=8 on
``qkv``, and visionpeft LoRA r=8 on ``qkv`` (head trainable in both).

    python benchmarks/step.py [--device cuda] [--repeats 2] [--out benchmarks/results/step.md]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from harness import freeze_all, main  # noqa: E402

RANK = 8


def build():
    import timm

    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10)


def make_batch(device):
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 224, 224, generator=g).to(device), torch.randint(0, 10, (8,), generator=g).to(device)


def loss_fn(model, inputs, target):
    return F.cross_entropy(model(inputs), target)


def floor(model):
    freeze_all(model)
    model.pos_embed.requires_grad_(True)
    model.head.requires_grad_(True)
    return model


def full(model):
    return model


def peft_lora(model):
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["qkv"]), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    model.head.requires_grad_(True)
    return model


def visionpeft_lora(model):
    import visionpeft as vp

    return vp.attach(model, "lora", targets=["qkv"], rank=RANK, unfreeze=["head"])


CONFIGS = {"floor": floor, "full": full, "peft-lora": peft_lora, "visionpeft-lora": visionpeft_lora}

if __name__ == "__main__":
    main(CONFIGS, build, make_batch, loss_fn, floor="floor", peer="peft-lora",
         title="LoRA r=8 on qkv, timm ViT-S/16, 224 px, batch 8")
