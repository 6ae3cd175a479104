"""The GPU suite: every visionpeft method against HF PEFT's LoRA and DoRA and LyCORIS, in one command that fits in
8 minutes on one H200-class GPU.

Workloads (random weights built from configs on the GPU itself; no download):

- ``vit_b16``: timm ViT-B/16, 224 px, batch 64; every method of ``vp.methods()`` on the family preset (q/k/v, proj,
  fc1, fc2 of every block), PEFT LoRA / DoRA and LyCORIS LoRA (LoCon) and LoKr on the same layers, head trainable;
- ``sd15_unet``: SD-1.5's UNet at full width (860M parameters), 64×64 latents, batch 4, 77 text tokens of width 768:
  LoRA, FLoRA, DoRA and SaRA against PEFT LoRA and LyCORIS LoRA (convs included);
- ``clip_b16``: open_clip ViT-B/16, CLIP-SVD's few-shot step (8 images × 10 prompts, both towers) against LoRA;
- ``flux``: a FLUX-structured transformer (diffusers ``FluxTransformer2DModel`` at FLUX.1's width, 1 double-stream and
  2 single-stream blocks), 1024 image tokens + 512 text tokens, batch 1: LoRA and DoRA against PEFT's and LyCORIS.

Each configuration runs in its own process (``harness.py``): CUDA-synchronised step times (forward, loss with
``vp.regularization``, backward, fused AdamW) after warm-up, and ``torch.cuda.max_memory_allocated`` of the
training steps. Matmuls run in TF32 (``torch.backends.cuda.matmul.allow_tf32``), as GPU training does. The suite
writes one markdown table (``OUT.md``: every workload and configuration, with ratios to the frozen floor, to our LoRA
and to PEFT's LoRA, followed by the parked GPU targets judged) and one JSON file (``OUT.json``: every row).

``--smoke`` runs every workload's configurations at tiny sizes on the CPU, in this one process, one step each: a
check that everything runs (CI runs it), not a measurement.

    python benchmarks/gpu.py --out benchmarks/results/gpu_h200          # on the GPU: writes .md and .json
    python benchmarks/gpu.py --smoke [--out DIR/gpu_smoke]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from harness import Workload, frozen_floor, machine, main, time_steps  # noqa: E402
from workloads import (  # noqa: E402
    classification_loss, image_batch, noise_loss, peft_adapter, sd_unet, unet_batch, vit_b16,
)

RANK = 8
SNELLA_DENSITY = 0.3
PEERS = ("peft-lora", "peft-dora", "lycoris-lora", "lycoris-lokr")
#: the parked GPU targets: (workload, method, peer, the largest step ratio allowed)
TARGETS = [("vit_b16", "snella", "lora", 1.3), ("sd15_unet", "sara", "lora", 1.2), ("clip_b16", "svd", "lora", 1.1)]

if torch.cuda.is_available():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


@dataclasses.dataclass
class SuiteWorkload(Workload):
    #: the layers every configuration adapts (visionpeft targets; the peers get the same layer names)
    targets: Any = None
    configs: tuple[str, ...] = ()


def on_device(build):
    """Build on the GPU when there is one: random init of an 860M UNet on the host alone takes longer than its steps."""
    def built():
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            return build()

    return built


# --- models and batches ----------------------------------------------------------------------------
def sd15_unet_full():
    return sd_unet(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, sample_size=64)


def sd_unet_tiny():
    return sd_unet(block_out_channels=(32, 32, 32, 32), cross_attention_dim=32, sample_size=8, norm_num_groups=8,
                   layers_per_block=1)


def clip_tiny():
    from visionpeft.models.configs import open_clip_model

    return open_clip_model()[0]


def clip_tiny_batch(device):
    g = torch.Generator().manual_seed(0)
    images, prompts = torch.randn(2, 3, 32, 32, generator=g), torch.randint(1, 64, (3, 8), generator=g)
    return (images.to(device), prompts.to(device)), torch.randint(0, 3, (2,), generator=g).to(device)


FLUX_FULL = dict(num_layers=1, num_single_layers=2)  # FLUX.1's width (24 heads of 128), depth 19 + 38 reduced
FLUX_TINY = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, in_channels=16,
                 joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))


def flux(config):
    def build():
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel(**config)

    return build


def flux_batch(config, image_tokens, text_tokens):
    def make(device):
        channels = config.get("in_channels", 64)
        g = torch.Generator().manual_seed(0)
        inputs = {
            "hidden_states": torch.randn(1, image_tokens, channels, generator=g),
            "encoder_hidden_states": torch.randn(1, text_tokens, config.get("joint_attention_dim", 4096), generator=g),
            "pooled_projections": torch.randn(1, config.get("pooled_projection_dim", 768), generator=g),
            "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(image_tokens, 3), "txt_ids": torch.zeros(text_tokens, 3),
        }
        side = int(image_tokens ** 0.5)
        inputs["img_ids"][:, 1] = torch.arange(image_tokens) // side
        inputs["img_ids"][:, 2] = torch.arange(image_tokens) % side
        return {k: v.to(device) for k, v in inputs.items()}, torch.randn(1, image_tokens, channels, generator=g).to(device)

    return make


def flux_loss(model, inputs, target):
    import visionpeft as vp

    return F.mse_loss(model(**inputs).sample, target) + vp.regularization(model)


FLUX_BLOCKS = r"(transformer_blocks|single_transformer_blocks)\.\d+\..+"
OURS = ("lora", "flora", "dora", "map", "mora", "alpha-lora", "nola", "snella", "snell", "sara", "svd")


def _clip():
    from svd import CLIP_B16  # benchmarks/svd.py: build, batch and loss of CLIP-SVD's few-shot step

    return CLIP_B16


def workloads() -> dict[str, SuiteWorkload]:
    clip = _clip()
    vit_configs = ("floor", *PEERS, *OURS)
    unet_configs = ("floor", "peft-lora", "lycoris-lora", "lora", "flora", "dora", "sara")
    clip_configs = ("floor", "lora", "svd")
    flux_configs = ("floor", "peft-lora", "peft-dora", "lycoris-lora", "lora", "dora")
    vit_floor = dict(floor_params=lambda m: [m.pos_embed], head=("head",))
    unet_floor = dict(floor_params=lambda m: [m.conv_in.bias])
    flux_floor = dict(floor_params=lambda m: [m.x_embedder.bias])
    clip_floor = dict(floor_params=clip.floor_params)
    from step import smoke_vit

    return {
        "vit_b16": SuiteWorkload("timm ViT-B/16, 224 px, batch 64", on_device(vit_b16),
                                 lambda device: image_batch(device, batch=64), classification_loss, **vit_floor,
                                 configs=vit_configs),
        "sd15_unet": SuiteWorkload("SD-1.5 UNet, full width (860M), 64×64 latents, batch 4", on_device(sd15_unet_full),
                                   lambda device: unet_batch(device, size=64, text_width=768,
                                                             timesteps=(10, 250, 500, 750)),
                                   noise_loss, **unet_floor, configs=unet_configs),
        "clip_b16": SuiteWorkload(clip.title, on_device(clip.build), clip.make_batch, clip.loss_fn, **clip_floor,
                                  configs=clip_configs),
        "flux": SuiteWorkload("FLUX-structured transformer (width 3072; 1 double + 2 single blocks), 1024 + 512 tokens",
                              on_device(flux(FLUX_FULL)), flux_batch(FLUX_FULL, 1024, 512), flux_loss, **flux_floor,
                              targets=FLUX_BLOCKS, configs=flux_configs),
        # --smoke: the same configurations at tiny sizes
        "smoke_vit": SuiteWorkload("smoke: 2-block ViT, 32 px, batch 2", smoke_vit,
                                   lambda device: image_batch(device, batch=2, size=32), classification_loss,
                                   **vit_floor, configs=vit_configs),
        "smoke_unet": SuiteWorkload("smoke: SD-structured UNet, width 32, 8×8 latents", sd_unet_tiny,
                                    lambda device: unet_batch(device, size=8, text_width=32), noise_loss, **unet_floor,
                                    configs=unet_configs),
        "smoke_clip": SuiteWorkload("smoke: open_clip CLIP, width 32", clip_tiny, clip_tiny_batch, clip.loss_fn,
                                    floor_params=lambda m: [m.positional_embedding, m.visual.positional_embedding],
                                    configs=clip_configs),
        "smoke_flux": SuiteWorkload("smoke: FLUX-structured transformer, width 32", flux(FLUX_TINY),
                                    flux_batch(FLUX_TINY, 16, 8), flux_loss, **flux_floor, targets=FLUX_BLOCKS,
                                    configs=flux_configs),
    }


GPU_WORKLOADS = ("vit_b16", "sd15_unet", "clip_b16", "flux")
SMOKE_OF = {"vit_b16": "smoke_vit", "sd15_unet": "smoke_unet", "clip_b16": "smoke_clip", "flux": "smoke_flux"}


# --- configurations --------------------------------------------------------------------------------
def layer_names(model, workload, single_group_only=False):
    """The module names visionpeft adapts for the workload's targets (the peers get exactly these)."""
    from visionpeft.targeting import resolve_targets

    names = [t.name for t in resolve_targets(model, workload.targets)]
    if single_group_only:  # PEFT refuses grouped convs unless the rank divides the groups
        modules = dict(model.named_modules())
        names = [n for n in names if getattr(modules[n], "groups", 1) == 1]
    return names


def train_head(model, workload):
    modules = dict(model.named_modules())
    for name in workload.head:
        modules[name].requires_grad_(True)
    return model


def peft(dora):
    def setup(model, workload):
        return peft_adapter(model, layer_names(model, workload, single_group_only=True), RANK, head=workload.head,
                            dora=dora)

    return setup


def lycoris(algo):
    def setup(model, workload):
        from lycoris import LycorisNetwork, create_lycoris

        names = layer_names(model, workload)
        LycorisNetwork.apply_preset({"target_name": [re.escape(n) + "$" for n in names]})
        for p in model.parameters():
            p.requires_grad_(False)
        network = create_lycoris(model, 1.0, linear_dim=RANK, linear_alpha=RANK, algo=algo, conv_dim=RANK,
                                 conv_alpha=RANK)
        network.apply_to()
        model.add_module("lycoris_network", network)  # so that its parameters are counted and optimized
        network.to(next(model.parameters()).device)
        for p in network.parameters():
            p.requires_grad_(True)
        return train_head(model, workload)

    return setup


def schedule_after_each_step(model, total_steps: int = 10_000) -> None:
    """``vp.step`` after every optimizer step that updates this model (the harness's loop does not call it)."""
    import visionpeft as vp
    from torch.optim.optimizer import register_optimizer_step_post_hook

    owned = {id(p) for p in model.parameters()}
    count = [0]

    def hook(optimizer, args, kwargs):
        if any(id(p) in owned for group in optimizer.param_groups for p in group["params"]):
            count[0] = min(count[0] + 1, total_steps)
            vp.step(model, count[0], total_steps)

    register_optimizer_step_post_hook(hook)


OPTIONS: dict[str, dict] = {
    "snella": dict(rank=RANK, density=SNELLA_DENSITY, init_density=SNELLA_DENSITY, warmup=0.0, final=0.0, interval=1),
    "snell": dict(rank=RANK, density=SNELLA_DENSITY),
    "sara": {}, "svd": {},
}


def ours(method):
    def setup(model, workload):
        import visionpeft as vp

        vp.attach(model, method, targets=workload.targets, unfreeze=list(workload.head),
                  **OPTIONS.get(method, dict(rank=RANK)))
        if method in ("snella", "sara"):  # budget re-allocation / progressive re-selection, as a training loop would
            schedule_after_each_step(model)
        return model

    return setup


CONFIGS = {"floor": frozen_floor, "peft-lora": peft(False), "peft-dora": peft(True),
           "lycoris-lora": lycoris("lora"), "lycoris-lokr": lycoris("lokr"), **{m: ours(m) for m in OURS}}


# --- the suite ------------------------------------------------------------------------------------
def run_smoke(names, device: str) -> list[dict]:
    """Every configuration of every workload in this process, one untimed-quality step each."""
    suite, rows = workloads(), []
    for name in names:
        workload = suite[name]
        for config in workload.configs:
            torch.manual_seed(0)
            model = CONFIGS[config](workload.build().to(device), workload)
            result = time_steps(model, workload.make_batch, workload.loss_fn, device, warmup=0, steps=1, live_peak=False)
            rows.append(dict(result, workload=name, config=config, machine=machine(device)))
            print(f"  {name}: {config:<14} ok", file=sys.stderr, flush=True)
    return rows


def run_suite(names, args) -> list[dict]:
    suite, rows = workloads(), []
    for name in names:
        argv = ["--workloads", name, "--configs", *suite[name].configs, "--device", args.device,
                "--warmup", str(args.warmup), "--steps", str(args.steps), "--repeats", str(args.repeats)]
        rows += [dict(r, workload=name) for r in main(CONFIGS, suite, floor="floor", peer="lora", argv=argv)]
    return rows


def _ratio(a, b):
    return f"{a / b:.2f}" if b else "–"


def render(rows: list[dict], title: str, device: str) -> str:
    by = {(r["workload"], r["config"]): r for r in rows}
    memory = "max_memory_allocated" if device.startswith("cuda") else "peak RSS"
    lines = [f"### {title}", "", f"Machine: {rows[0]['machine']}.", "",
             "| workload | configuration | trainable params | step (ms) | × floor | × our LoRA | × PEFT LoRA | "
             f"{memory} (MB) | above floor (MB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        floor, lora, peft_lora = (by.get((r["workload"], c)) for c in ("floor", "lora", "peft-lora"))
        over = f"{r['peak_mb'] - floor['peak_mb']:+.0f}" if floor else "–"
        lines.append(f"| {r['workload']} | {r['config']} | {r['trainable']:,} | {1000 * r['step_s']:.1f} | "
                     f"{_ratio(r['step_s'], floor and floor['step_s'])} | {_ratio(r['step_s'], lora and lora['step_s'])} | "
                     f"{_ratio(r['step_s'], peft_lora and peft_lora['step_s'])} | {r['peak_mb']:.0f} | {over} |")
    judged = judge(rows)
    if judged:
        lines += ["", "| target | measured | |", "|---|---:|---|"]
        lines += [f"| {t['method']} ≤ {t['limit']}× {t['peer']}'s step ({t['workload']}) | {t['ratio']:.2f}× | "
                  f"{'met' if t['met'] else 'missed'} |" for t in judged]
    return "\n".join(lines)


def judge(rows: list[dict]) -> list[dict]:
    by = {(r["workload"], r["config"]): r for r in rows}
    judged = []
    for workload, method, peer, limit in TARGETS:
        for name in (workload, SMOKE_OF[workload]):
            if (name, method) in by and (name, peer) in by:
                ratio = by[name, method]["step_s"] / by[name, peer]["step_s"]
                judged.append(dict(workload=name, method=method, peer=peer, limit=limit, ratio=ratio,
                                   met=ratio <= limit))
    return judged


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, in this process, one step each")
    parser.add_argument("--workloads", nargs="+", choices=GPU_WORKLOADS, default=list(GPU_WORKLOADS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", help="write OUT.md (the table) and OUT.json (every row)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    if "--child" in sys.argv:  # one configuration, started by harness.main
        main(CONFIGS, workloads(), floor="floor", peer="lora")
        sys.exit(0)
    args = parse(sys.argv[1:])
    start = time.perf_counter()
    if args.smoke:
        rows = run_smoke([SMOKE_OF[w] for w in args.workloads], "cpu")
    else:
        if not args.device.startswith("cuda"):
            print("warning: the suite is meant for a GPU; --smoke checks it on the CPU", file=sys.stderr)
        rows = run_suite(args.workloads, args)
    elapsed = time.perf_counter() - start
    table = render(rows, ("smoke (tiny sizes, one step: not a measurement)" if args.smoke else "GPU suite")
                   + f", {elapsed:.0f} s in all", "cpu" if args.smoke else args.device)
    print(table)
    if args.out:
        with open(f"{args.out}.md", "w") as fh:
            fh.write(table + "\n")
        with open(f"{args.out}.json", "w") as fh:
            json.dump({"smoke": args.smoke, "seconds": elapsed, "settings": vars(args), "rows": rows,
                       "targets": judge(rows)}, fh, indent=2)
