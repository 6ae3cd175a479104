"""Mixed-batch inference: ``vp.routing`` against PEFT's ``adapter_names`` and against one forward per adapter.

ViT-S/16 at 224 px, 4 LoRA adapters (rank 8, every Linear of the blocks), batch 16 with samples interleaved over
the adapters (sample i → adapter i mod 4), inference under ``torch.inference_mode``. Configurations:

- ``base``: the frozen model, no adapter (the floor);
- ``one-adapter``: visionpeft with one adapter active for the whole batch, the bound for any routed LoRA;
- ``visionpeft``: ``with vp.routing(model, per_sample): model(x)``;
- ``peft``: ``peft_model(x, adapter_names=per_sample)`` on the same layers;
- ``separate``: visionpeft, one forward per adapter on its own samples (``vp.set_active`` each time).

Each configuration runs in its own process, all with the same fixed glibc malloc thresholds; the table gives the median
time and the ratio to PEFT (target for visionpeft: <= 0.8x). ``--order contiguous`` gives each adapter a block of
consecutive samples instead (sample i → adapter 4i // batch), the case where ``vp.routing`` runs each adapter's branch
on its slice of rows.
``--size tiny`` is a seconds-long smoke run of the same code.

    python benchmarks/routing.py --repeats 3                       # the measurement
    python benchmarks/routing.py --repeats 3 --order contiguous    # grouped batch
    python benchmarks/routing.py --size tiny --iters 2             # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

CONFIGS = ("base", "one-adapter", "visionpeft", "peft", "separate")
ADAPTERS = ("a0", "a1", "a2", "a3")
#: glibc's malloc returns freed activation-sized blocks to the OS by thresholds it moves as it goes, so the same
#: configuration reads up to 20 % apart between processes from page faults alone; fixed thresholds keep freed
#: memory in the heap for every configuration alike
STEADY_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "40000000000"}


def build(size: str):
    import timm

    if size == "tiny":
        return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=10), 32
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10), 224


def perturbed(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or ".vp_adapters." in name:
                param.add_(torch.randn_like(param) * 0.02)
    return model


def setup(config: str, model):
    """``(model, per_sample) -> output`` for one configuration."""
    import visionpeft as vp

    if config == "base":
        return lambda x, per_sample: model(x)
    if config == "peft":
        import peft

        from visionpeft.targeting import resolve_targets

        targets = [t.name for t in resolve_targets(model, None)]  # exactly the layers visionpeft adapts
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets),
                                      adapter_name=ADAPTERS[0])
        for name in ADAPTERS[1:]:
            wrapped.add_adapter(name, peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets))
        perturbed(wrapped).eval()
        return lambda x, per_sample: wrapped(x, adapter_names=per_sample)
    for name in ADAPTERS:
        vp.attach(model, "lora", name=name, rank=8)
    perturbed(model).eval()
    if config == "one-adapter":
        vp.set_active(model, ADAPTERS[0])
        return lambda x, per_sample: model(x)
    if config == "visionpeft":
        def routed(x, per_sample):
            with vp.routing(model, per_sample):
                return model(x)
        return routed

    def separate(x, per_sample):
        out = torch.empty(x.shape[0], 10)
        for name in ADAPTERS:
            rows = torch.tensor([i for i, n in enumerate(per_sample) if n == name])
            vp.set_active(model, name)
            out[rows] = model(x[rows])
        return out
    return separate


def assignment(order: str, batch: int) -> list[str]:
    if order == "contiguous":
        return [ADAPTERS[i * len(ADAPTERS) // batch] for i in range(batch)]
    return [ADAPTERS[i % len(ADAPTERS)] for i in range(batch)]


def child(config: str, size: str, batch: int, iters: int, warmup: int, device: str, order: str) -> dict:
    import time

    torch.manual_seed(0)
    model, px = build(size)
    model = model.to(device).eval()
    run = setup(config, model)
    x = torch.randn(batch, 3, px, px, device=device)
    per_sample = assignment(order, batch)
    samples = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(x, per_sample)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                samples.append(time.perf_counter() - start)
    return {"config": config, "ms": 1000 * statistics.median(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("vit-s16", "tiny"), default="vit-s16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the configurations, interleaved")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--order", choices=("interleaved", "contiguous"), default="interleaved",
                        help="samples over adapters: i mod 4, or consecutive blocks")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.size, args.batch, args.iters, args.warmup, args.device,
                                args.order)))
        return
    times: dict[str, list[float]] = {c: [] for c in args.configs}
    for _ in range(args.repeats):
        for config in args.configs:
            command = [sys.executable, __file__, "--child", config, "--size", args.size, "--batch", str(args.batch),
                       "--iters", str(args.iters), "--warmup", str(args.warmup), "--device", args.device,
                       "--order", args.order]
            line = subprocess.run(command, check=True, capture_output=True, text=True,
                                  env=dict(os.environ, **STEADY_ALLOCATOR)).stdout.strip().splitlines()[-1]
            times[config].append(json.loads(line)["ms"])
    median = {c: statistics.median(t) for c, t in times.items()}
    print(f"ViT-S/16 ({args.size}), {len(ADAPTERS)} LoRA adapters (rank 8), batch {args.batch} {args.order}, "
          f"inference, {args.device}, torch {torch.__version__}")
    print("| configuration | ms | × PEFT adapter_names |")
    print("|---|---|---|")
    for config, ms in median.items():
        ratio = f"{ms / median['peft']:.2f}" if "peft" in median else "-"
        print(f"| {config} | {ms:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
