"""CLIP-SVD: attach time (every SVD) and training-step time against LoRA r=8, on an open_clip model with
CLIP ViT-B/16's architecture built from its config (random weights; no download).

The step is few-shot classification as CLIP-SVD trains it: 8 images (224 px) against 10 class prompts
(77 tokens), text classifier recomputed every step, both towers adapted with the family preset (q, k, v,
out and both MLP matrices of every block). The floor trains only both towers' positional embeddings.
``svd-weight`` and ``svd-factorized`` force the two exact forward paths; ``svd`` is the default.

    python benchmarks/svd.py [--device cuda] [--out FILE]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from harness import Workload, frozen_floor, main  # noqa: E402


def build():
    import open_clip

    return open_clip.create_model("ViT-B-16", pretrained=None)


def make_batch(device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 224, 224, generator=g)
    prompts = torch.randint(1, 49000, (10, 77), generator=g)
    return (images.to(device), prompts.to(device)), torch.randint(0, 10, (8,), generator=g).to(device)


def loss_fn(model, inputs, target):
    images, prompts = inputs
    image = F.normalize(model.encode_image(images), dim=-1)
    text = F.normalize(model.encode_text(prompts), dim=-1)
    return F.cross_entropy(model.logit_scale.exp() * image @ text.t(), target)


CLIP_B16 = Workload("CLIP ViT-B/16 (open_clip, 150M), few-shot step: 8 images × 10 prompts", build, make_batch, loss_fn,
                    floor_params=lambda m: [m.positional_embedding, m.visual.positional_embedding])


def lora(model, workload):
    import visionpeft as vp

    return vp.attach(model, "lora", rank=8)


def svd(path):
    def setup(model, workload):
        import visionpeft as vp

        return vp.attach(model, "svd", path=path)

    return setup


CONFIGS = {"floor": frozen_floor, "lora-r8": lora, "svd": svd("auto"), "svd-weight": svd("weight"),
           "svd-factorized": svd("factorized")}

if __name__ == "__main__":
    main(CONFIGS, {"clip_b16": CLIP_B16}, floor="floor", peer="lora-r8")
