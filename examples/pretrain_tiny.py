"""Pretrain the tiny backbones that ship with visionpeft (``visionpeft.models.tiny``).

Each backbone learns five label families at once (object shape, object colour, background texture,
object count, quadrant of the objects' mean position) on an endless stream of procedurally generated 32×32
scenes (``visionpeft.data.procedural``): one linear head per family, the sum of their cross-entropies,
AdamW with warm-up and cosine decay. Batch ``i`` is drawn from seed ``i`` and torch runs in
deterministic mode, so the same command on the same machine gives the same weights. The trunk is
written to ``visionpeft/models/weights/tiny_<backbone>.safetensors`` (fp32, about 5 MB) with the
run's record (steps, seconds, held-out accuracy per family) in the file's metadata; training curves
go to ``--output``. About 10 minutes per backbone on 2 CPU cores.

    python examples/pretrain_tiny.py [--backbone vit convnet] [--steps 1500] [--batch-size 128]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from visionpeft.data.procedural import PRETRAINING_LABELS, pretraining_batch
from visionpeft.models.tiny import CONFIGS, MEAN, STD, build_tiny, trunk_state, weights_path

HELD_OUT_SEED = 10**9
LR = {"vit": 2e-3, "convnet": 4e-3}


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def family_losses(logits: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    chunks = logits.split(list(PRETRAINING_LABELS.values()), dim=1)
    return {family: F.cross_entropy(chunk, labels[family]) for family, chunk in zip(PRETRAINING_LABELS, chunks)}


@torch.no_grad()
def held_out_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    logits = torch.cat([model(normalise(images[i:i + 500])) for i in range(0, len(images), 500)])
    model.train()
    chunks = logits.split(list(PRETRAINING_LABELS.values()), dim=1)
    return {family: round(100.0 * (chunk.argmax(1) == labels[family]).float().mean().item(), 2)
            for family, chunk in zip(PRETRAINING_LABELS, chunks)}


def pretrain(backbone: str, steps: int, batch_size: int, output: Path, weights: Path | None = None) -> dict:
    """Pretrain one backbone; its trunk goes to ``weights`` (default: the package's file)."""
    torch.manual_seed(0)
    model = build_tiny(backbone, num_classes=sum(PRETRAINING_LABELS.values()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR[backbone], weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item()))
    held_out = pretraining_batch(2000, HELD_OUT_SEED)
    history, start = [], time.perf_counter()
    bar = tqdm(range(steps), desc=f"pretrain tiny {backbone}", unit="step")
    for step in bar:
        images, labels = pretraining_batch(batch_size, seed=step)
        losses = family_losses(model(normalise(images)), labels)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history.append({"step": step + 1, "loss": loss.item()})
        if (step + 1) % 250 == 0 or step + 1 == steps:
            history[-1]["accuracy"] = held_out_accuracy(model, *held_out)
            bar.write(f"step {step + 1}: loss {loss.item():.3f}, held-out accuracy {history[-1]['accuracy']}")
        bar.set_postfix(loss=f"{loss.item():.3f}")
    record = {"backbone": backbone, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in CONFIGS[backbone].items()},
              "steps": steps, "batch_size": batch_size, "lr": LR[backbone], "seconds": round(time.perf_counter() - start),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "held_out_accuracy": history[-1]["accuracy"], "label_families": PRETRAINING_LABELS}
    save_trunk(model, weights or weights_path(backbone), record)
    plot(history, output / f"tiny_{backbone}_pretraining.png", backbone)
    return record


def save_trunk(model: torch.nn.Module, path: Path, record: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in trunk_state(model).items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(state, tmp, metadata={"pretraining": json.dumps(record)})
    os.chmod(tmp, 0o644)  # package data: readable by everyone (mkstemp creates 0600)
    os.replace(tmp, path)


def plot(history: list[dict], path: Path, backbone: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([r["step"] for r in history], [r["loss"] for r in history], lw=0.6)
    left.set(xlabel="step", ylabel="sum of family losses", title="training loss")
    evaluated = [r for r in history if "accuracy" in r]
    for family in PRETRAINING_LABELS:
        right.plot([r["step"] for r in evaluated], [r["accuracy"][family] for r in evaluated], marker="o", label=family)
    right.set(xlabel="step", ylabel="held-out accuracy (%)", title="per label family")
    right.legend(fontsize=8)
    fig.suptitle(f"tiny {backbone}: pretraining on procedural scenes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results are reproducible per count)")
    parser.add_argument("--output", default="runs/pretrain_tiny")
    parser.add_argument("--weights-dir", default=None, help="write tiny_<backbone>.safetensors here instead of the package")
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 1:
        parser.error(f"--steps and --batch-size must be >= 1 (got {args.steps}, {args.batch_size})")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    for backbone in args.backbone:
        weights = Path(args.weights_dir) / weights_path(backbone).name if args.weights_dir else None
        record = pretrain(backbone, args.steps, args.batch_size, Path(args.output), weights)
        print(json.dumps(record))


if __name__ == "__main__":
    main()
