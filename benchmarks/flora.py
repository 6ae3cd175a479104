"""FLoRA against the anchors' conv adapters: training-step time and peak memory on conv models.

Workloads: timm ResNet-50 and ConvNeXt-T (224 px, batch 8), a UNet with SD-1.5's block structure at CPU
width (``visionpeft.models.configs.sd15_like_unet``, 35M parameters, batch 2, 32×32 latents), and SD-1.5's
UNet at its real width (860M parameters, batch 1, 16×16 latents). Every adapter targets the family
preset's layers (every conv / linear of the repeated blocks), at roughly matched parameter counts:
FLoRA rank 8 (spatial rank 2), HF PEFT LoRA rank 5, LyCORIS LoCon with Tucker (``use_tucker``) rank 8.
The frozen floor trains only a stem norm (or the UNet's conv_in bias) and the head, so activation
gradients flow through every block and no block weight gets a gradient. ``flora-weight`` forces the
W + ΔW path, to compare with the default (branch on activations). ``--dora`` compares visionpeft DoRA (and MAP,
and LoRA) with HF PEFT's DoRA (``use_dora``) at LoRA's rank 5 on the same layers, PEFT's DoRA as the peer.

    python benchmarks/flora.py [--workloads resnet50 convnext_t unet sd15_unet] [--device cuda] [--out FILE]
    python benchmarks/flora.py --dora [--workloads resnet50] [--out FILE]   # DoRA on convs against PEFT's DoRA
    python benchmarks/flora.py --contraction      # ΔW by torch.einsum vs tensorly multi_mode_dot
    python benchmarks/flora.py --depthwise        # a depthwise kernel's weight gradient: aten vs visionpeft
    python benchmarks/flora.py --pointwise        # a rank-8 1×1 map: oneDNN conv vs visionpeft's bmm
    python benchmarks/flora.py --in-place         # adding a branch into a linear output: fresh vs in place
"""
from __future__ import annotations

import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import Workload, frozen_floor, machine, main, median_ms  # noqa: E402
from workloads import (  # noqa: E402
    classification_loss, image_batch, noise_loss, peft_adapter, sd15_unet, sd15_unet_batch, sd_unet, unet_batch,
)

FLORA_RANK, LORA_RANK, LYCORIS_RANK = 8, 5, 8


def classifier(name):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)

    return build


WORKLOADS = {
    "resnet50": Workload("Conv adapters on timm ResNet-50, 224 px, batch 8", classifier("resnet50"), image_batch,
                         classification_loss,
                         floor_params=lambda m: list(m.bn1.parameters()), head=("fc",)),
    "convnext_t": Workload("Conv adapters on timm ConvNeXt-T, 224 px, batch 8", classifier("convnext_tiny"), image_batch,
                           classification_loss,
                           floor_params=lambda m: list(m.stem[1].parameters()), head=("head.fc",)),
    "unet": Workload("Conv adapters on an SD-1.5-structured UNet (35M params), 32×32 latents, batch 2", sd_unet,
                     unet_batch, noise_loss,
                     floor_params=lambda m: [m.conv_in.bias]),
    "sd15_unet": Workload("Conv adapters on SD-1.5's UNet at full width (860M params), 16×16 latents, batch 1",
                          sd15_unet, sd15_unet_batch, noise_loss, floor_params=lambda m: [m.conv_in.bias]),
}


def preset_names(model):
    from visionpeft.targeting import resolve_targets

    return [t.name for t in resolve_targets(model, None)]


def train_head(model, workload):
    modules = dict(model.named_modules())
    for name in workload.head:
        modules[name].requires_grad_(True)
    return model


def full(model, workload):
    return model


def peft(dora):
    """PEFT refuses grouped convs unless the rank divides the groups (ConvNeXt's depthwise convs), so it
    adapts the preset's other layers there."""
    def setup(model, workload):
        modules = dict(model.named_modules())
        names = [n for n in preset_names(model) if getattr(modules[n], "groups", 1) == 1]
        return peft_adapter(model, names, LORA_RANK, head=workload.head, dora=dora)

    return setup


def lycoris_tucker(model, workload):
    from lycoris import LycorisNetwork, create_lycoris

    names = preset_names(model)
    LycorisNetwork.apply_preset({"target_name": [re.escape(n) + "$" for n in names]})
    for p in model.parameters():
        p.requires_grad_(False)
    network = create_lycoris(model, 1.0, linear_dim=LYCORIS_RANK, linear_alpha=LYCORIS_RANK, algo="lora",
                             use_tucker=True, conv_dim=LYCORIS_RANK, conv_alpha=LYCORIS_RANK)
    network.apply_to()
    model.add_module("lycoris_network", network)  # so its parameters are counted and optimized
    for p in network.parameters():
        p.requires_grad_(True)
    return train_head(model, workload)


def flora(path):
    def setup(model, workload):
        import visionpeft as vp

        return vp.attach(model, "flora", rank=FLORA_RANK, path=path, unfreeze=list(workload.head))

    return setup


def low_rank(method):
    """visionpeft ``method`` at PEFT LoRA's rank on the preset's layers (every one: grouped convs included)."""
    def setup(model, workload):
        import visionpeft as vp

        return vp.attach(model, method, rank=LORA_RANK, unfreeze=list(workload.head))

    return setup


CONFIGS = {"floor": frozen_floor, "full": full, "peft-lora": peft(False), "lycoris-tucker": lycoris_tucker,
           "flora": flora("auto"), "flora-weight": flora("weight"),
           "peft-dora": peft(True), "lora": low_rank("lora"), "dora": low_rank("dora"), "map": low_rank("map")}
FLORA_CONFIGS = ["floor", "full", "peft-lora", "lycoris-tucker", "flora", "flora-weight"]
DORA_CONFIGS = ["floor", "peft-dora", "lora", "dora", "map"]


def contraction_benchmark(repeats: int = 20) -> str:
    """ΔW = G ×₁ U₁ … ×_N U_N forward + backward: one torch.einsum, tensorly's multi_mode_dot, and
    visionpeft's ordered mode products (kernel modes, then in, then out)."""
    import tensorly
    from tensorly.tenalg import multi_mode_dot

    from visionpeft.methods.flora import tucker_to_tensor, tucker_to_tensor_einsum

    lines = ["| weight shape | ranks | torch.einsum (ms) | tensorly multi_mode_dot (ms) | visionpeft ordered (ms) |",
             "|---|---|---:|---:|---:|"]
    for shape, ranks in [((256, 256, 3, 3), (8, 8, 2, 2)), ((1280, 1280, 3, 3), (16, 16, 2, 2)),
                         ((2304, 768), (16, 16)), ((640, 320, 3, 3), (8, 8, 2, 2))]:
        core = torch.randn(ranks, requires_grad=True)
        factors = [torch.randn(d, r, requires_grad=True) for d, r in zip(shape, ranks)]
        times = {}
        with tensorly.backend_context("pytorch"):
            for name, fn in (("einsum", lambda: tucker_to_tensor_einsum(core, factors)),
                             ("tensorly", lambda: multi_mode_dot(core, factors)),
                             ("ordered", lambda: tucker_to_tensor(core, factors))):
                times[name] = median_ms(lambda: fn().square().sum().backward(), repeats, warmup=3)
        lines.append(f"| {shape} | {ranks} | {times['einsum']:.2f} | {times['tensorly']:.2f} | {times['ordered']:.2f} |")
    return "\n".join(lines)


def depthwise_benchmark(repeats: int = 10) -> str:
    """A depthwise conv's weight gradient: aten's CPU kernel against ``visionpeft.layers.depthwise``'s grouped
    forward conv, on ConvNeXt-T's 7×7 layers at batch 8, 224 px (and the forward for scale)."""
    import torch.nn.functional as F

    from visionpeft.layers.depthwise import depthwise_weight_gradient

    lines = [f"{machine('cpu')}", "",
             "| input (N, C, H, W) | layout | forward (ms) | aten weight gradient (ms) | visionpeft weight gradient (ms) | speed-up |",
             "|---|---|---:|---:|---:|---:|"]
    for shape in [(8, 96, 56, 56), (8, 192, 28, 28), (8, 384, 14, 14), (8, 768, 7, 7)]:
        for layout in (torch.contiguous_format, torch.channels_last):  # timm's ConvNeXt feeds channels-last
            x, grad = (torch.randn(shape).contiguous(memory_format=layout) for _ in range(2))
            weight = torch.randn(shape[1], 1, 7, 7)
            forward = median_ms(lambda: F.conv2d(x, weight, None, 1, 3, 1, shape[1]), repeats, warmup=2)
            aten = median_ms(lambda: torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [3, 3], [1, 1], False, [0, 0], shape[1], [False, True, False]),
                repeats, warmup=2)
            ours = median_ms(lambda: depthwise_weight_gradient(x, grad, (7, 7), (1, 1), (3, 3), (1, 1)),
                             repeats, warmup=2)
            name = "NCHW" if layout is torch.contiguous_format else "channels-last"
            lines.append(f"| {shape} | {name} | {forward:.1f} | {aten:.1f} | {ours:.1f} | {aten / ours:.1f}× |")
    return "\n".join(lines)


def pointwise_benchmark(repeats: int = 30, rank: int = 8) -> str:
    """A rank-r 1×1 map (FLoRA's U_in, a 1×1 layer's down-projection), forward and backward (input and weight
    gradients): oneDNN's convolution against ``visionpeft.methods.lowrank``'s batched matrix product."""
    import importlib

    lowrank = importlib.import_module("visionpeft.methods.lowrank")
    lines = [f"{machine('cpu')}", "",
             "| input (N, C, H, W) | conv forward (ms) | conv backward (ms) | bmm forward (ms) | bmm backward (ms) "
             "| speed-up, forward + backward |", "|---|---:|---:|---:|---:|---:|"]
    for shape in [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4), (1, 320, 64, 64),
                  (8, 64, 56, 56), (8, 256, 56, 56), (8, 1024, 14, 14)]:
        x, weight = torch.randn(shape), torch.randn(shape[1], rank)
        grad = torch.randn(shape[0], rank, *shape[2:])
        kernel = weight.t().reshape(rank, shape[1], 1, 1).contiguous()
        conv_forward = median_ms(lambda: torch.ops.aten.convolution(
            x, kernel, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1), repeats, warmup=3)
        conv_backward = median_ms(lambda: torch.ops.aten.convolution_backward(
            grad, x, kernel, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False]), repeats, warmup=3)
        bmm_forward = median_ms(lambda: lowrank._pointwise(x, weight), repeats, warmup=3)
        bmm_backward = median_ms(lambda: lowrank._pointwise_backward(grad, x, weight, True, True), repeats, warmup=3)
        speedup = (conv_forward + conv_backward) / (bmm_forward + bmm_backward)
        lines.append(f"| {shape} | {conv_forward:.2f} | {conv_backward:.2f} | {bmm_forward:.2f} | {bmm_backward:.2f} "
                     f"| {speedup:.1f}× |")
    return "\n".join(lines)


def in_place_benchmark(repeats: int = 20, rank: int = 8) -> str:
    """Adding a rank-r branch into a linear op's output: a fresh result (``torch.addmm``), the same product
    into a preallocated buffer (``out=``, no fresh memory), and in place into the output (``addmm_``)."""
    lines = [f"{machine('cpu')}", "",
             "| output (rows × features) | fresh result (ms) | into a reused buffer (ms) | in place (ms) |",
             "|---|---:|---:|---:|"]
    for rows, features in [(25088, 384), (25088, 96), (6272, 768), (2048, 64), (512, 256)]:
        out, h, up = torch.randn(rows, features), torch.randn(rows, rank), torch.randn(features, rank)
        buffer = torch.empty_like(out)
        fresh = median_ms(lambda: torch.addmm(out, h, up.t()), repeats, warmup=3)
        reused = median_ms(lambda: torch.addmm(out, h, up.t(), out=buffer), repeats, warmup=3)
        in_place = median_ms(lambda: out.addmm_(h, up.t()), repeats, warmup=3)
        lines.append(f"| {rows} × {features} | {fresh:.2f} | {reused:.2f} | {in_place:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--contraction" in sys.argv:
        print(contraction_benchmark())
    elif "--depthwise" in sys.argv:
        print(depthwise_benchmark())
    elif "--pointwise" in sys.argv:
        print(pointwise_benchmark())
    elif "--in-place" in sys.argv:
        print(in_place_benchmark())
    elif "--dora" in sys.argv:
        argv = [a for a in sys.argv[1:] if a != "--dora"]
        argv += [] if "--configs" in argv else ["--configs", *DORA_CONFIGS]
        argv += [] if "--workloads" in argv else ["--workloads", "resnet50"]
        main(CONFIGS, WORKLOADS, floor="floor", peer="peft-dora", argv=argv)
    else:
        argv = sys.argv[1:]
        argv += [] if "--configs" in argv or "--child" in argv else ["--configs", *FLORA_CONFIGS]
        main(CONFIGS, WORKLOADS, floor="floor", peer="peft-lora", argv=argv)
