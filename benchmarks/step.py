"""Training-step time and peak memory of LoRA on a timm ViT-S/16 (224 px, batch 8) against HF PEFT.

Configurations: the frozen floor (trunk frozen, only ``pos_embed`` and the head trainable: activation
gradients flow through every block, no weight gradients), full fine-tuning, HF PEFT LoRA r=8 on
``qkv``, and visionpeft LoRA r=8 on ``qkv`` (head trainable in both).

    python benchmarks/step.py [--device cuda] [--repeats 3] [--out benchmarks/results/step_cpu.md]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from harness import Workload, frozen_floor, main  # noqa: E402
from workloads import classification_loss, image_batch, vit_s16  # noqa: E402

RANK = 8

VIT_S = Workload("LoRA r=8 on qkv, timm ViT-S/16, 224 px, batch 8", vit_s16, image_batch, classification_loss,
                 floor_params=lambda m: [m.pos_embed], head=("head",))


def full(model, workload):
    return model


def peft_lora(model, workload):
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["qkv"]), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    model.head.requires_grad_(True)
    return model


def visionpeft_lora(model, workload):
    import visionpeft as vp

    return vp.attach(model, "lora", targets=["qkv"], rank=RANK, unfreeze=["head"])


CONFIGS = {"floor": frozen_floor, "full": full, "peft-lora": peft_lora, "visionpeft-lora": visionpeft_lora}

if __name__ == "__main__":
    main(CONFIGS, {"vit_s16": VIT_S}, floor="floor", peer="peft-lora")
