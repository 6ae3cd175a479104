"""Compiled against eager training-step time for LoRA, FLoRA and SNELLA (r=8, the family preset: every weight of the
blocks) on timm ViT-S/16, 224 px, batch 8, and the frozen floor both ways.

A compiled configuration is the same model after ``model.compile()`` (inductor; the module keeps its identity, so
``vp.regularization`` and ``vp.step`` see the adapters); it compiles during the untimed warm-up steps. Each
configuration runs in its own process (``harness.py``). After the harness's table, a second one gives each
method's compiled ÷ eager step. ``--size tiny`` runs a 2-block ViT at 32 px: a check that every configuration
runs, not a measurement.

    python benchmarks/compile.py [--repeats 3] [--device cpu] [--out benchmarks/results/compile_cpu.md]
    python benchmarks/compile.py --size tiny
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from harness import Workload, frozen_floor, main  # noqa: E402
from snella import step_after_every_optimizer_step  # noqa: E402
from step import smoke_vit  # noqa: E402
from workloads import classification_loss, image_batch, vit_s16  # noqa: E402

RANK = 8
WORKLOADS = {
    "vit_s16": Workload("eager vs torch.compile, timm ViT-S/16, 224 px, batch 8", vit_s16, image_batch,
                        classification_loss, floor_params=lambda m: [m.pos_embed], head=("head",)),
    "tiny": Workload("smoke: eager vs torch.compile, 2-block ViT, 32 px, batch 2", smoke_vit,
                     lambda device: image_batch(device, batch=2, size=32), classification_loss,
                     floor_params=lambda m: [m.pos_embed], head=("head",)),
}
METHODS = {"lora": {}, "flora": {}, "snella": dict(density=0.5, init_density=0.5, warmup=0.0, final=0.0, interval=1)}


def adapter(method, compiled):
    def setup(model, workload):
        import visionpeft as vp

        vp.attach(model, method, rank=RANK, unfreeze=["head"], **METHODS[method])
        if method == "snella":  # budgets re-allocated after every step, as in benchmarks/snella.py
            step_after_every_optimizer_step(model)
        if compiled:
            model.compile()
        return model

    return setup


def floor(compiled):
    def setup(model, workload):
        frozen_floor(model, workload)
        if compiled:
            model.compile()
        return model

    return setup


CONFIGS = {"floor": floor(False), "floor-compiled": floor(True)}
for _name in METHODS:
    CONFIGS[_name] = adapter(_name, False)
    CONFIGS[f"{_name}-compiled"] = adapter(_name, True)


def compiled_ratios(rows: list[dict]) -> str:
    by = {r["config"]: r["step_s"] for r in rows}
    lines = ["| configuration | eager step (s) | compiled step (s) | compiled ÷ eager |", "|---|---:|---:|---:|"]
    for name in ("floor", *METHODS):
        if name in by and f"{name}-compiled" in by:
            eager, compiled = by[name], by[f"{name}-compiled"]
            lines.append(f"| {name} | {eager:.3f} | {compiled:.3f} | {compiled / eager:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--size" in argv:  # --size tiny|full: the workload
        at = argv.index("--size")
        size = argv[at + 1]
        if size not in ("tiny", "full"):
            raise SystemExit(f"--size {size!r}: allowed 'tiny' or 'full'")
        argv[at:at + 2] = ["--workloads", "tiny" if size == "tiny" else "vit_s16"]
    elif "--workloads" not in argv:
        argv += ["--workloads", "vit_s16"]
    rows = main(CONFIGS, WORKLOADS, floor="floor", peer="lora", argv=argv)
    if "--child" not in argv:
        table = compiled_ratios(rows)
        print(table)
        if "--out" in argv:
            with open(argv[argv.index("--out") + 1], "a") as fh:
                fh.write("\n" + table + "\n")
