"""What it costs that a weight read directly by an enclosing forward carries W + ΔW (layers/direct_reads.py).

Two questions, one LoRA training step (forward + backward, rank 8, targets=None) each:

- ``tracking``: the pre/post hooks on every ancestor of an adapted layer and the attribute check, which every
  model pays. ViT-S/16 with the hooks against the same model with the hooks removed (``untracked``: what the
  layers cost without any direct-read handling).
- ``carried``: EVA-02-S, whose attention reads ``qkv.weight`` directly, so LoRA on ``qkv`` runs as W + ΔW there,
  against the same model with its q/v biases folded into a plain ``qkv`` bias (``called``: qkv's own forward
  runs, LoRA takes its activation path).

The configurations alternate within one process, ``--repeats`` rounds of ``--iters`` steps each; the table gives
the median step time per configuration and the ratio to its reference.

    python benchmarks/direct_reads.py --repeats 5 --iters 10          # the measurement
    python benchmarks/direct_reads.py --size tiny --repeats 2 --iters 2  # smoke
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _models(size: str):
    import timm

    if size == "tiny":
        common = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
        return (timm.create_model("vit_small_patch16_224", pretrained=False, **common),
                timm.create_model("eva02_small_patch14_224", pretrained=False, **dict(common, img_size=28, patch_size=14)),
                32, 28)
    return (timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10),
            timm.create_model("eva02_small_patch14_224", pretrained=False, num_classes=10), 224, 224)


def _fold_qkv_bias(model):
    """Each EVA attention's separate q/k/v biases as qkv's own bias: the attention then calls qkv."""
    for module in model.modules():
        if getattr(module, "q_bias", None) is not None and module.qkv is not None:
            bias = torch.cat((module.q_bias, module.k_bias, module.v_bias)).detach()
            module.qkv.bias = torch.nn.Parameter(bias)
            module.q_bias = module.k_bias = module.v_bias = None
    return model


def _step(model, x):
    model(x).square().mean().backward()


def _time(model, x, iters):
    _step(model, x)  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        _step(model, x)
    return (time.perf_counter() - start) / iters


def main() -> None:
    import copy

    import visionpeft as vp
    from visionpeft.layers import direct_reads

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    vit, eva, vit_px, eva_px = _models(args.size)
    called = _fold_qkv_bias(copy.deepcopy(eva))
    configs = {}
    for label, model in (("tracking", vit), ("untracked", copy.deepcopy(vit)), ("carried", eva), ("called", called)):
        configs[label] = vp.attach(model.train(), "lora", rank=8)
    for module in configs["untracked"].modules():
        direct_reads._remove_hooks(module)
    inputs = {"tracking": vit_px, "untracked": vit_px, "carried": eva_px, "called": eva_px}
    inputs = {k: torch.randn(args.batch, 3, px, px) for k, px in inputs.items()}
    times = {k: [] for k in configs}
    for _ in range(args.repeats):
        for label, model in configs.items():
            times[label].append(_time(model, inputs[label], args.iters))
    median = {k: statistics.median(v) for k, v in times.items()}
    print("| configuration | step (ms) | ratio |\n|---|---|---|")
    for label, reference in (("tracking", "untracked"), ("untracked", "untracked"), ("carried", "called"),
                             ("called", "called")):
        print(f"| {label} | {1000 * median[label]:.2f} | {median[label] / median[reference]:.3f} |")


if __name__ == "__main__":
    main()
