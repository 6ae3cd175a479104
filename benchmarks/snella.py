"""SNELLA: training-step time and peak memory on a timm ViT-S/16 and ViT-B/16 (the paper's model; 224 px,
batch 8), against LoRA of the same rank, dense masked sparse tuning, and the frozen floor; and the effect of
the exact zero start.

Every adapter targets the family preset (q, k, v, proj, fc1, fc2 of every block) with the head trainable.

- ``floor``: trunk frozen, only ``pos_embed`` and the head train (activation gradients through every block).
- ``lora-r8``: LoRA r=8.
- ``snella-r8``: SNELLA r=8 (default path: the op runs with W + ΔW), softmax-mixture kernel, every layer masked at ``DENSITY`` from the first step,
  with ``vp.step`` called after every optimizer step (importance EMAs, re-allocation every step).
- ``snella-r8-activation``: the same with ``path="activation"`` (x·ΔWᵀ added to the output: two more matmuls).
- ``snell-r8``: SNELL r=8 (distance kernel, fixed ``DENSITY`` per layer).
- ``masked-dense``: the GPS/SPT-style baseline: the same weights trained in full by AdamW with a fixed gradient
  mask keeping ``DENSITY`` of each weight's entries (optimizer state and gradients are weight-sized).

Memory is best read as the overhead above the floor (the targets: SNELLA's overhead ≤ 0.3× the masked
baseline's and ≤ 1.2× LoRA's; step time ≤ 1.3× LoRA's).

    python benchmarks/snella.py [--workloads vit_s16 vit_b16] [--device cuda] [--repeats 3] [--out benchmarks/results/snella_cpu.md]
    python benchmarks/snella.py --init-compare [--steps 150]   # exact zero start vs the reference's start
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from harness import Workload, frozen_floor, main  # noqa: E402
from workloads import classification_loss, image_batch, vit_b16, vit_s16  # noqa: E402

RANK = 8
DENSITY = 0.3
PRESET = ("qkv", "proj", "fc1", "fc2")


VIT_S = Workload(f"SNELLA r={RANK} vs LoRA and masked dense tuning (density {DENSITY}), timm ViT-S/16, 224 px, batch 8",
                 vit_s16, image_batch, classification_loss, floor_params=lambda m: [m.pos_embed], head=("head",))
# the paper's model: weights (and the masked baseline's AdamW state) weigh 4x ViT-S's against 2x the activations
VIT_B = Workload(f"SNELLA r={RANK} vs LoRA and masked dense tuning (density {DENSITY}), timm ViT-B/16, 224 px, batch 8",
                 vit_b16, image_batch, classification_loss, floor_params=lambda m: [m.pos_embed], head=("head",))


def lora(model, workload):
    import visionpeft as vp

    return vp.attach(model, "lora", rank=RANK, unfreeze=["head"])


def step_after_every_optimizer_step(model, total_steps: int = 10_000) -> None:
    """Call ``vp.step`` where a training loop would (after optimizer.step, before zero_grad): the harness's
    loop does not know about it, so a global optimizer post-step hook does it."""
    import visionpeft as vp
    from torch.optim.optimizer import register_optimizer_step_post_hook

    count = [0]

    def hook(optimizer, args, kwargs):
        count[0] = min(count[0] + 1, total_steps)
        vp.step(model, count[0], total_steps)

    register_optimizer_step_post_hook(hook)


def snella(path):
    def setup(model, workload):
        import visionpeft as vp

        vp.attach(model, "snella", rank=RANK, density=DENSITY, init_density=DENSITY, warmup=0.0, final=0.0, interval=1,
                  path=path, unfreeze=["head"])
        step_after_every_optimizer_step(model)
        return model

    return setup


def snell(model, workload):
    import visionpeft as vp

    return vp.attach(model, "snell", rank=RANK, density=DENSITY, unfreeze=["head"])


def masked_dense(model, workload):
    """Full weights of the targeted layers trainable, their gradients masked to a fixed ``DENSITY`` subset."""
    frozen_floor(model, workload)
    model.pos_embed.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if name.startswith("blocks.") and name.rsplit(".", 1)[-1] in PRESET:
            weight = module.weight
            mask = (torch.rand(weight.shape, generator=generator) < DENSITY).to(weight.device)
            weight.requires_grad_(True)
            weight.register_hook(lambda grad, mask=mask: grad * mask)
    return model


CONFIGS = {"floor": frozen_floor, "lora-r8": lora, "snella-r8": snella("weight"), "snella-r8-activation": snella("activation"),
           "snell-r8": snell, "masked-dense": masked_dense}


# --- the effect of the exact zero start -----------------------------------------------------------
@torch.no_grad()
def reference_start(model) -> None:
    """Re-draw the second kernel piece independently, as the reference code does: K starts small, not zero."""
    from visionpeft.core import adapted_layers

    for _, layer in adapted_layers(model):
        for _, _, method in layer.vp_methods():
            for pieces in (method.in_pieces, method.out_pieces):
                bound = 1 / math.sqrt(pieces.shape[1] * pieces.shape[2])
                pieces[1].uniform_(-bound, bound)


def init_compare(steps: int) -> None:
    """A small ViT learns to match a teacher (the same ViT with sparse weight changes in its blocks), from
    SNELLA's exact zero start and from the reference's independent pieces; prints the loss over training."""
    import visionpeft as vp
    from visionpeft.models import build as build_tiny

    torch.manual_seed(0)
    base, _ = build_tiny("timm_vit", embed_dim=64, depth=4, num_heads=4, img_size=32)
    base.eval()
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name.startswith("blocks.") and name.endswith("weight") and p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.05 * (torch.rand_like(p) < DENSITY))
    images = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        target = teacher.forward_features(images)
    checkpoints = sorted({0, steps // 10, steps // 4, steps // 2, steps})
    rows = {}
    for start in ("exact", "reference"):
        torch.manual_seed(1)
        model = vp.attach(copy.deepcopy(base), "snella", rank=RANK, density=DENSITY)
        if start == "reference":
            reference_start(model)
        optimizer = torch.optim.AdamW(vp.trainable_parameters(model).values(), lr=3e-3, weight_decay=0.0)
        losses = {}
        for step in range(steps + 1):
            loss = F.mse_loss(model.forward_features(images), target)
            if step in checkpoints:
                losses[step] = loss.item()
            if step == steps:
                break
            loss.backward()
            optimizer.step()
            vp.step(model, step + 1, steps)
            optimizer.zero_grad(set_to_none=True)
        rows[start] = losses
    print(f"### SNELLA start: feature MSE to a sparse-shifted teacher (tiny ViT, r={RANK}, density {DENSITY}, "
          f"AdamW lr 3e-3, {steps} steps)\n")
    print("| start | " + " | ".join(f"step {s}" for s in checkpoints) + " |")
    print("|---|" + "---:|" * len(checkpoints))
    for start, losses in rows.items():
        print(f"| {start} | " + " | ".join(f"{losses[s]:.5f}" for s in checkpoints) + " |")


if __name__ == "__main__":
    if "--init-compare" in sys.argv:
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("--init-compare", action="store_true")
        parser.add_argument("--steps", type=int, default=150)
        init_compare(parser.parse_args().steps)
    else:
        main(CONFIGS, {"vit_s16": VIT_S, "vit_b16": VIT_B}, floor="floor", peer="lora-r8")
