"""Quick start: LoRA on a small timm ViT, fine-tuned on scikit-learn's handwritten digits.

Runs offline on a laptop CPU in about a minute: no weights or data are downloaded. The ViT is
built from a timm config (randomly initialised until the project ships its own pretrained tiny
backbones), LoRA is attached to every block with ``visionpeft.attach``, the classifier head is
unfrozen, and the adapter is saved, loaded back and merged to show that all three are exact.

    python examples/quickstart.py [--method lora] [--rank 8] [--epochs 6] [--output runs/quickstart]
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from tqdm import tqdm

import visionpeft as vp


def digits(image_size: int = 32):
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    images = (images - 0.5) / 0.5
    labels = torch.tensor(data.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=generator)
    train, test = order[:1000], order[1000:]
    return (images[train], labels[train]), (images[test], labels[test])


@torch.no_grad()
def accuracy(model, images, labels, batch=256) -> float:
    model.eval()
    correct = sum((model(images[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum().item()
                  for i in range(0, len(labels), batch))
    return 100.0 * correct / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora", choices=vp.methods())
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output", default="runs/quickstart")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    (train_x, train_y), (test_x, test_y) = digits()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                              embed_dim=96, depth=4, num_heads=3, num_classes=10)
    base = copy.deepcopy(model)
    vp.attach(model, args.method, rank=args.rank, unfreeze=["head"])
    print(vp.summary(model))

    params = list(vp.trainable_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(train_y) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"{args.method} r{args.rank}", unit="step")
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_y))
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            idx = order[i:i + args.batch_size]
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx]) + vp.regularization(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            vp.step(model, bar.n + 1, steps)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
    bar.close()
    seconds = time.perf_counter() - start
    top1 = accuracy(model, test_x, test_y)

    output = Path(args.output)
    vp.save(model, output / "adapter")
    reloaded = vp.load(copy.deepcopy(base), output / "adapter")
    assert accuracy(reloaded, test_x, test_y) == top1, "save/load must be exact"
    vp.merge(reloaded)
    merged_top1 = accuracy(reloaded, test_x, test_y)
    trainable = sum(p.numel() for p in params)
    print(f"\n{args.method}: top-1 {top1:.1f}% on {len(test_y)} held-out digits after {steps} steps "
          f"({seconds:.0f} s), {trainable:,} trainable parameters; merged top-1 {merged_top1:.1f}%")
    print(f"adapter saved to {output / 'adapter'}")


if __name__ == "__main__":
    main()
