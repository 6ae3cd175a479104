"""SaRA against LoRA, full fine-tuning, dense masked sparse tuning and the frozen floor: training-step time
and peak memory.

Workloads: a UNet with SD-1.5's block structure (``visionpeft.models.configs.sd15_like_unet``, batch 2,
32×32 latents, MSE on the noise), the same UNet at SD-1.5's real width (860M parameters, 16×16 latents,
batch 1: where weights, not activations, dominate full fine-tuning's memory) and timm ViT-S/16 (224 px, batch 8, head trained by every
configuration). The loss of every configuration includes ``vp.regularization(model)`` (SaRA's rank
penalty on one random layer; zero for the others). Configurations:

* ``floor``: trunk frozen, activation gradients only (the reference for memory overhead);
* ``full``: every parameter in AdamW;
* ``lora``: visionpeft LoRA rank 8 on the family preset;
* ``sara``: SaRA on the preset layers with ``budget`` = LoRA's trainable count (``path="auto"``: linear
  ops at <= 10 % density compute only the selected entries of dW, everything else takes the weight path,
  W + ΔW rebuilt in backward); ``sara-weight``: the weight path everywhere (the dense dW gathered);
  ``sara-sparse``: ``path="sparse"`` on linear ops (CSR products); ``sara-all``: ``targets="all"`` (every
  tensor, as the paper) at the same budget;
* ``masked``: LT-SFT-style dense masked sparse tuning: the preset weights themselves in AdamW with a
  gradient hook that zeroes every entry outside the same smallest-magnitude selection (a dense bool mask).

The targets: memory overhead above the floor ≤ 0.3× full's and ≤ 0.5× masked's; step time
≤ 1.2× LoRA's.

    python benchmarks/sara.py [--workloads unet sd15_unet vit_s16] [--device cuda] [--out FILE]
    python benchmarks/sara.py --backprop    # one linear layer: weight, sampled and sparse paths (fwd + bwd)
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import Workload, frozen_floor, main, median_ms  # noqa: E402
from workloads import (  # noqa: E402
    classification_loss, image_batch, noise_loss, sd15_unet, sd15_unet_batch, sd_unet, unet_batch, vit_s16,
)

LORA_RANK = 8


WORKLOADS = {
    "unet": Workload("SaRA on an SD-1.5-structured UNet, 32×32 latents, batch 2", sd_unet, unet_batch, noise_loss,
                     floor_params=lambda m: [m.conv_in.bias]),
    "sd15_unet": Workload("SaRA on SD-1.5's UNet at full width (860M params), 16×16 latents, batch 1", sd15_unet,
                          sd15_unet_batch, noise_loss, floor_params=lambda m: [m.conv_in.bias]),
    "vit_s16": Workload("SaRA on timm ViT-S/16, 224 px, batch 8", vit_s16, image_batch, classification_loss,
                        floor_params=lambda m: [m.pos_embed], head=("head",)),
}


def lora_count(model) -> int:
    """LoRA rank-8's trainable count on the preset: Σ rank · (out + fan_in) over the slots."""
    from visionpeft.targeting import resolve_targets

    return sum(LORA_RANK * (slot.out_features + slot.in_features)
               for t in resolve_targets(model, None) for slot in (t.kind.slot(t.module, s, t.name) for s in t.slots))


def full(model, workload):
    return model


def lora(model, workload):
    import visionpeft as vp

    return vp.attach(model, "lora", rank=LORA_RANK, unfreeze=list(workload.head))


def sara(targets=None, path="auto"):
    def setup(model, workload):
        import visionpeft as vp

        return vp.attach(model, "sara", targets=targets, budget=lora_count(model), path=path,
                         unfreeze=list(workload.head))

    return setup


def sara_linear_only(model, workload):
    """``sara`` with the sampled gradient on linear ops only (convs on the weight path): an ablation."""
    from visionpeft.methods.sara import SaRA

    sampled = SaRA.gradient_from_output
    SaRA.gradient_from_output = lambda self, slot: slot.op == "linear" and sampled(self, slot)
    return sara()(model, workload)


def masked(model, workload):
    """Dense masked sparse tuning (LT-SFT style): whole weights in AdamW, gradients masked to the selection."""
    from visionpeft.methods.sara import global_threshold
    from visionpeft.targeting import resolve_targets

    frozen_floor(model, workload)
    weights = [t.kind.read(t.module, s) for t in resolve_targets(model, None) for s in t.slots]
    theta = global_threshold(weights, lora_count(model))
    for weight in weights:
        param = weight if weight.is_leaf else weight.t()  # transformers' Conv1D is read transposed
        mask = param.detach().abs() < theta
        param.requires_grad_(True)
        param.register_hook(lambda grad, mask=mask: grad * mask)
    return model


CONFIGS = {"floor": frozen_floor, "full": full, "lora": lora, "sara": sara(), "sara-weight": sara(path="weight"),
           "sara-linear-only": sara_linear_only,
           "sara-sparse": sara(path="sparse"),
           "sara-all": sara(targets="all"), "masked": masked}


def backprop_benchmark(repeats: int = 10, only_conv: bool = False) -> str:
    """Forward + backward of one linear or conv layer with SaRA on each path, x needing a gradient (the
    sparse path is linear-only: on a conv it measures the weight path)."""
    import copy

    import visionpeft as vp

    paths = ("weight", "sampled", "sparse")
    lines = ["| (out, in[, kernel]), tokens or (batch, h, w) | density | " + " | ".join(f"{p} path (ms)" for p in paths) + " | sampled ÷ weight |",
             "|---|---:|" + "---:|" * (len(paths) + 1)]
    layers = [((1536, 384), 1576), ((384, 1536), 1576), ((320, 320), 2048), ((1280, 1280), 512),
              ((256, 256, 3), (2, 16, 16)), ((640, 640, 3), (1, 8, 8)), ((1280, 1280, 3), (1, 4, 4))]
    if only_conv:
        layers = [layer for layer in layers if len(layer[0]) == 3]
    for shape, tokens in layers:
        for density in (0.01, 0.03, 0.05, 0.1, 0.2, 0.3):
            torch.manual_seed(0)
            if len(shape) == 3:  # (out, in, kernel) conv on (batch, height, width)
                out, fan_in, kernel = shape
                base = torch.nn.Sequential(torch.nn.Conv2d(fan_in, out, kernel, padding=kernel // 2))
                x = torch.randn(tokens[0], fan_in, *tokens[1:], requires_grad=True)
            else:
                out, fan_in = shape
                base = torch.nn.Sequential(torch.nn.Linear(fan_in, out))
                x = torch.randn(tokens, fan_in, requires_grad=True)
            times = {"sparse": float("nan")}  # the sparse path is linear-only
            for path in paths if len(shape) == 2 else paths[:2]:
                model = vp.attach(copy.deepcopy(base), "sara", targets=["0"], density=density, path=path)
                times[path] = median_ms(lambda: model(x).square().mean().backward(), repeats, warmup=2)
            lines.append(f"| {shape}, {tokens} | {density} | "
                         + " | ".join(f"{times[p]:.1f}" for p in paths) + f" | {times['sampled'] / times['weight']:.2f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    if "--backprop" in sys.argv:
        print(backprop_benchmark(only_conv="--conv" in sys.argv))
    else:
        main(CONFIGS, WORKLOADS, floor="floor", peer="lora")
