"""Training-step time and peak memory of LoRA, DoRA and MAP on a timm ViT-S/16 (224 px, batch 8) against HF PEFT.

Configurations: the frozen floor (trunk frozen, only ``pos_embed`` and the head trainable: activation
gradients flow through every block, no weight gradients), full fine-tuning, HF PEFT LoRA and DoRA
(``use_dora``) r=8 on ``qkv``, and visionpeft LoRA, DoRA and MAP r=8 on ``qkv`` (head trainable in all).
``--dora`` compares the DoRA family with PEFT's DoRA as the peer; ``--inference`` times the forward alone
(no gradients): the base model, DoRA unmerged and DoRA merged (``vp.merge``: the base's speed).
``--extras`` compares MoRA r=8 on ``qkv``, α-LoRA r=8 on ``qkv`` and NOLA r=8 (k = l = 1024) on ``qkv`` and the
MLP (``fc1``, ``fc2``) with our LoRA, on ``qkv`` and on those same layers; ``--workloads smoke`` runs any of these
on a 2-block ViT at 32 px in seconds (a check that they run, not a measurement).

    python benchmarks/step.py [--device cuda] [--repeats 3] [--out benchmarks/results/step_cpu.md]
    python benchmarks/step.py --dora [--repeats 3] [--out benchmarks/results/dora_step_cpu.md]
    python benchmarks/step.py --inference [--repeats 20] [--workloads smoke]
    python benchmarks/step.py --extras [--repeats 3] [--out benchmarks/results/extras_step_cpu.md]
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


def smoke_vit():
    """ViT-S/16's architecture at 2 blocks, width 64 and 32 px: a check that a configuration runs, in seconds."""
    import timm

    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                             depth=2, embed_dim=64, num_heads=2)


SMOKE = Workload("smoke: 2-block ViT, 32 px, batch 2", smoke_vit, lambda device: image_batch(device, batch=2, size=32),
                 classification_loss, floor_params=lambda m: [m.pos_embed], head=("head",))
VIT_S_DORA = Workload("DoRA r=8 on qkv, timm ViT-S/16, 224 px, batch 8", vit_s16, image_batch, classification_loss,
                      floor_params=lambda m: [m.pos_embed], head=("head",))


def full(model, workload):
    return model


def peft(dora):
    def setup(model, workload):
        return peft_adapter(model, ["qkv"], RANK, head=("head",), dora=dora)

    return setup


def visionpeft(method, targets=("qkv",), **options):
    def setup(model, workload):
        import visionpeft as vp

        return vp.attach(model, method, targets=list(targets), rank=RANK, unfreeze=["head"], **options)

    return setup


QKV_MLP = ("qkv", "fc1", "fc2")


CONFIGS = {"floor": frozen_floor, "full": full, "peft-lora": peft(False), "visionpeft-lora": visionpeft("lora"),
           "peft-dora": peft(True), "visionpeft-dora": visionpeft("dora"), "visionpeft-map": visionpeft("map"),
           "visionpeft-lora-qkv-mlp": visionpeft("lora", QKV_MLP), "visionpeft-mora": visionpeft("mora"),
           "visionpeft-nola-qkv-mlp": visionpeft("nola", QKV_MLP, num_basis=(1024, 1024)),
           "visionpeft-alpha-lora": visionpeft("alpha-lora")}
LORA_CONFIGS = ["floor", "full", "peft-lora", "visionpeft-lora"]
DORA_CONFIGS = ["floor", "peft-dora", "visionpeft-lora", "visionpeft-dora", "visionpeft-map"]
#: targets: MoRA and α-LoRA against visionpeft-lora (qkv), NOLA against visionpeft-lora-qkv-mlp (same layers)
EXTRAS_CONFIGS = ["floor", "visionpeft-lora", "visionpeft-mora", "visionpeft-alpha-lora", "visionpeft-lora-qkv-mlp",
                  "visionpeft-nola-qkv-mlp"]


def inference_benchmark(device: str = "cpu", repeats: int = 20, smoke: bool = False) -> str:
    """Forward time without gradients: base, DoRA as attached (perturbed), and DoRA merged into the weights
    (which should run at the base's speed); ``smoke``: on the 2-block ViT at 32 px, a check that it runs."""
    import torch

    import visionpeft as vp

    torch.manual_seed(0)
    workload = SMOKE if smoke else VIT_S
    inputs, _ = workload.make_batch(device)
    model = workload.build().to(device).eval()
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
    lines = [f"Machine: {machine(device)}; {'smoke ViT, 32 px, batch 2' if smoke else 'ViT-S/16, 224 px, batch 8'}, "
             f"forward under no_grad, median of {repeats}.", "",
             "| model | forward (ms) | × base |", "|---|---:|---:|"]
    lines += [f"| {label} | {ms:.1f} | {ms / base_ms:.2f} |" for label, ms in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--inference" in argv:
        repeats = int(argv[argv.index("--repeats") + 1]) if "--repeats" in argv else 20
        device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
        smoke = "--workloads" in argv and argv[argv.index("--workloads") + 1] == "smoke"
        print(inference_benchmark(device, repeats, smoke))
    elif "--extras" in argv:
        argv.remove("--extras")
        if "--configs" not in argv and "--child" not in argv:
            argv += ["--configs", *EXTRAS_CONFIGS]
        if "--workloads" not in argv and "--child" not in argv:
            argv += ["--workloads", "vit_s16"]
        main(CONFIGS, {"vit_s16": VIT_S, "smoke": SMOKE}, floor="floor", peer="visionpeft-lora", argv=argv)
    elif "--dora" in argv:
        argv.remove("--dora")
        if "--configs" not in argv and "--child" not in argv:
            argv += ["--configs", *DORA_CONFIGS]
        main(CONFIGS, {"vit_s16": VIT_S_DORA}, floor="floor", peer="peft-dora", argv=argv)
    else:
        if "--configs" not in argv and "--child" not in argv:
            argv += ["--configs", *LORA_CONFIGS]
        workloads = {"vit_s16": VIT_S, "smoke": SMOKE} if "--child" in argv else {"vit_s16": VIT_S}  # children of --extras
        main(CONFIGS, workloads, floor="floor", peer="peft-lora", argv=argv)
