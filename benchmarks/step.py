"""Training-step time and peak memory of LoRA, DoRA and MAP on a timm ViT-S/16 (224 px, batch 8) against HF PEFT.

Configurations: the frozen floor (trunk frozen, only ``pos_embed`` and the head trainable: activation
gradients flow through every block, no weight gradients), full fine-tuning, HF PEFT LoRA and DoRA
(``use_dora``) r=8 on ``qkv``, and visionpeft LoRA, DoRA and MAP r=8 on ``qkv`` (head trainable in all).
``--dora`` compares the DoRA family with PEFT's DoRA as the peer; ``--inference`` times the forward alone
(no gradients): the base model, DoRA unmerged and DoRA merged (``vp.merge``: the base's speed).

    python benchmarks/step.py [--device cuda] [--repeats 3] [--out benchmarks/results/step_cpu.md]
    python benchmarks/step.py --dora [--repeats 3] [--out benchmarks/results/dora_step_cpu.md]
    python benchmarks/step.py --inference [--repeats 20]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from harness import Workload, frozen_floor, machine, main, median_ms  # noqa: E402
from workloads import classification_loss, image_batch, peft_adapter, vit_s16  # noqa: E402

RANK = 8

VIT_S = Workload("LoRA r=8 on qkv, timm ViT-S/16, 224 px, batch 8", vit_s16, image_batch, classification_loss,
                 floor_params=lambda m: [m.pos_embed], head=("head",))
VIT_S_DORA = Workload("DoRA r=8 on qkv, timm ViT-S/16, 224 px, batch 8", vit_s16, image_batch, classification_loss,
                      floor_params=lambda m: [m.pos_embed], head=("head",))


def full(model, workload):
    return model


def peft(dora):
    def setup(model, workload):
        return peft_adapter(model, ["qkv"], RANK, head=("head",), dora=dora)

    return setup


def visionpeft(method):
    def setup(model, workload):
        import visionpeft as vp

        return vp.attach(model, method, targets=["qkv"], rank=RANK, unfreeze=["head"])

    return setup


CONFIGS = {"floor": frozen_floor, "full": full, "peft-lora": peft(False), "visionpeft-lora": visionpeft("lora"),
           "peft-dora": peft(True), "visionpeft-dora": visionpeft("dora"), "visionpeft-map": visionpeft("map")}
LORA_CONFIGS = ["floor", "full", "peft-lora", "visionpeft-lora"]
DORA_CONFIGS = ["floor", "peft-dora", "visionpeft-lora", "visionpeft-dora", "visionpeft-map"]


def inference_benchmark(device: str = "cpu", repeats: int = 20) -> str:
    """Forward time without gradients: base, DoRA as attached (perturbed), and DoRA merged into the weights."""
    import torch

    import visionpeft as vp

    torch.manual_seed(0)
    inputs, _ = image_batch(device)
    model = vit_s16().to(device).eval()
    rows = []

    def timed(label):
        with torch.no_grad():
            rows.append((label, median_ms(lambda: model(inputs), repeats, warmup=3)))

    timed("base")
    vp.attach(model, "dora", targets=["qkv"], rank=RANK)
    with torch.no_grad():
        for p in vp.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.01)
    timed("dora (unmerged)")
    vp.merge(model)
    timed("dora (merged)")
    base_ms = rows[0][1]
    lines = [f"Machine: {machine(device)}; ViT-S/16, 224 px, batch 8, forward under no_grad, median of {repeats}.", "",
             "| model | forward (ms) | × base |", "|---|---:|---:|"]
    lines += [f"| {label} | {ms:.1f} | {ms / base_ms:.2f} |" for label, ms in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--inference" in argv:
        repeats = int(argv[argv.index("--repeats") + 1]) if "--repeats" in argv else 20
        device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
        print(inference_benchmark(device, repeats))
    elif "--dora" in argv:
        argv.remove("--dora")
        if "--configs" not in argv and "--child" not in argv:
            argv += ["--configs", *DORA_CONFIGS]
        main(CONFIGS, {"vit_s16": VIT_S_DORA}, floor="floor", peer="peft-dora", argv=argv)
    else:
        if "--configs" not in argv and "--child" not in argv:
            argv += ["--configs", *LORA_CONFIGS]
        main(CONFIGS, {"vit_s16": VIT_S}, floor="floor", peer="peft-lora", argv=argv)
