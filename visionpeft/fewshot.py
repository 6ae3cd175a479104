"""Few-shot CLIP classification: prompts → text classifier, K-shot sampling, training and evaluation.

Works with open_clip models (``encode_image``/``encode_text``) and transformers ``CLIPModel``
(``get_image_features``/``get_text_features``). The text classifier is recomputed at every training
step, because adapters such as CLIP-SVD tune the text tower too. Logits are cosine similarities times
the model's own ``logit_scale.exp()``. Data come as (image tensor, label) pairs, e.g. from
:class:`CoOpSplit` (the CoOp/CLIP-SVD split JSON format).
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

import visionpeft as vp


class ClipClassifier(nn.Module):
    """A CLIP model seen as a classifier over class names written into prompt templates."""

    def __init__(self, model: nn.Module, tokenize: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                 templates: Sequence[str] = ("a photo of a {}.",)) -> None:
        super().__init__()
        if not classnames:
            raise ValueError("classnames is empty")
        bad = [t for t in templates if "{}" not in t]
        if not templates or bad:
            raise ValueError(f"every template needs a '{{}}' for the class name; got {list(templates)!r}")
        self.model = model
        self.tokenize = tokenize
        self.classnames = list(classnames)
        self.templates = list(templates)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "encode_image"):
            features = self.model.encode_image(images)
        else:
            features = self.model.get_image_features(pixel_values=images)
        return F.normalize(_features(features), dim=-1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(prompts)
        if isinstance(tokens, dict) or hasattr(tokens, "keys"):
            tokens = {k: v.to(self._device()) for k, v in tokens.items()}
            features = self.model.get_text_features(**tokens)
        elif hasattr(self.model, "encode_text"):
            features = self.model.encode_text(tokens.to(self._device()))
        else:
            features = self.model.get_text_features(input_ids=tokens.to(self._device()))
        return F.normalize(_features(features), dim=-1)

    def text_classifier(self) -> torch.Tensor:
        """(classes, dim): per class, the normalized mean of its normalized prompt embeddings."""
        prompts = [t.format(c) for c in self.classnames for t in self.templates]
        embeddings = self.encode_text(prompts).view(len(self.classnames), len(self.templates), -1)
        return F.normalize(embeddings.mean(1), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def forward(self, images: torch.Tensor, classifier: torch.Tensor | None = None) -> torch.Tensor:
        classifier = self.text_classifier() if classifier is None else classifier
        return self.logit_scale() * self.encode_image(images) @ classifier.t()


def _features(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for key in ("text_embeds", "image_embeds", "pooler_output"):
        value = getattr(output, key, None)
        if value is not None:
            return value
    raise TypeError(f"cannot read features from {type(output).__name__}")


def kshot_indices(labels: Sequence[int], shots: int, seed: int) -> list[int]:
    """``shots`` examples of every class, drawn with ``random.Random(seed)`` (CoOp's convention)."""
    if shots < 1:
        raise ValueError(f"shots={shots} must be >= 1")
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[int(label)].append(index)
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_class):
        pool = by_class[label]
        chosen += rng.sample(pool, shots) if len(pool) >= shots else [rng.choice(pool) for _ in range(shots)]
    return chosen


@torch.no_grad()
def evaluate(classifier: ClipClassifier, data: Dataset, batch_size: int = 64, num_workers: int = 0) -> float:
    """Top-1 accuracy (%) on ``data``."""
    was_training = classifier.training
    classifier.eval()
    text = classifier.text_classifier()
    correct = total = 0
    for images, labels in DataLoader(data, batch_size=batch_size, num_workers=num_workers):
        prediction = classifier(images.to(text.device), text).argmax(-1).cpu()
        correct += (prediction == labels).sum().item()
        total += labels.numel()
    classifier.train(was_training)
    return 100.0 * correct / max(total, 1)


def train_few_shot(classifier: ClipClassifier, train: Dataset, test: Dataset, *, shots: int, seed: int = 1,
                   steps: int | None = None, batch_size: int = 32, lr: float = 5e-4, weight_decay: float = 0.01,
                   progress: bool = True, warmup_steps: int = 0, min_lr: float = 1e-6, precision: str = "no",
                   eval_interval: int | None = None, eval_batch_size: int = 64, num_workers: int = 0,
                   on_step: Callable[[dict], None] | None = None) -> dict[str, float]:
    """Train the adapters attached to ``classifier.model`` on a K-shot subset of ``train``.

    ``steps`` defaults to 200·K (CLIP-SVD's protocol); AdamW with ``warmup_steps`` of linear warm-up, then a
    cosine schedule to ``min_lr``. ``precision`` "bf16"/"fp16" runs the forward under autocast (fp16 with a
    gradient scaler, so small gradients of singular values do not underflow). ``on_step`` receives one record
    per step (``step``, ``loss``, ``lr``, ``seconds``, ``top1`` every ``eval_interval`` steps and at the end),
    and first a step-0 record holding the zero-shot top-1. Returns the zero-shot top-1 before training, the
    few-shot top-1 after, the final training loss and the median step time.
    """
    params = list(vp.trainable_parameters(classifier.model).values())
    if not params:
        raise ValueError("the CLIP model has no trainable parameters: attach an adapter first (vp.attach)")
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision={precision!r}; allowed: {', '.join(AUTOCAST_DTYPES)}")
    labels = [int(train[i][1]) for i in range(len(train))] if not hasattr(train, "labels") else train.labels
    subset = Subset(train, kshot_indices(labels, shots, seed))
    steps = 200 * shots if steps is None else steps
    report = on_step or (lambda record: None)
    zero_shot = evaluate(classifier, test, eval_batch_size, num_workers)
    report({"step": 0, "loss": None, "lr": None, "seconds": None, "top1": zero_shot})
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(subset, batch_size=min(batch_size, len(subset)), shuffle=True, generator=generator,
                        drop_last=True, num_workers=num_workers)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup_steps, min_lr / lr))
    classifier.train()
    device = params[0].device
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step, loss, top1, step_times = 0, float("nan"), None, []
    bar = tqdm(total=steps, desc=f"{shots}-shot", disable=not progress)
    while step < steps:
        for images, targets in loader:
            start = time.perf_counter()
            with _autocast(precision, device):
                logits = classifier(images.to(device))
            batch_loss = F.cross_entropy(logits.float(), targets.to(device)) + vp.regularization(classifier.model)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(batch_loss).backward()
            scaler.step(optimizer)
            scaler.update()
            lr_used = schedule.get_last_lr()[0]
            schedule.step()
            vp.step(classifier.model, step + 1, steps)
            loss = batch_loss.item()
            step += 1
            step_times.append(time.perf_counter() - start)
            top1 = None
            if step == steps or (eval_interval and step % eval_interval == 0):
                top1 = evaluate(classifier, test, eval_batch_size, num_workers)
            report({"step": step, "loss": loss, "lr": lr_used, "seconds": step_times[-1], "top1": top1})
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr_used:.1e}", refresh=False)
            bar.update()
            if step >= steps:
                break
    bar.close()
    few_shot = top1 if top1 is not None else evaluate(classifier, test, eval_batch_size, num_workers)
    return {"zero_shot_top1": zero_shot, "few_shot_top1": few_shot, "final_loss": loss,
            "steps": steps, "shots": shots, "seed": seed,
            "step_time_s": statistics.median(step_times) if step_times else None}


AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(precision: str, device: torch.device):
    dtype = AUTOCAST_DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def warmup_cosine(steps: int, warmup_steps: int, floor: float) -> Callable[[int], float]:
    """The lr factor of a linear warm-up over ``warmup_steps``, then a cosine from 1 to ``floor`` at ``steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))

    return factor


class CoOpSplit(Dataset):
    """One split of a CoOp-style split JSON: ``{"train": [[relative_path, label, classname], ...], "val": ..., "test": ...}``."""

    def __init__(self, split_file: str | Path, image_root: str | Path, split: str,
                 transform: Callable | None = None) -> None:
        split_file, image_root = Path(split_file), Path(image_root)
        if not split_file.is_file():
            raise FileNotFoundError(f"split file {str(split_file)!r} does not exist")
        try:
            content = json.loads(split_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(split_file)!r} is not JSON: {err}") from None
        if not isinstance(content, dict) or split not in content:
            have = sorted(content) if isinstance(content, dict) else type(content).__name__
            raise ValueError(f"{str(split_file)!r} has no split {split!r}; it has {have} "
                             f"(expected keys 'train', 'val', 'test')")
        items = []
        for position, entry in enumerate(content[split]):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[1], int) and isinstance(entry[2], str)):
                raise ValueError(f"{str(split_file)!r} {split}[{position}] is {entry!r}; expected [relative_path, int label, classname]")
            items.append((image_root / entry[0], entry[1], entry[2]))
        self.items = items
        self.labels = [label for _, label, _ in items]
        names: dict[int, str] = {}
        for _, label, name in items:
            names.setdefault(label, name)
        self.classnames = [names[i] for i in sorted(names)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label, _ = self.items[index]
        if not path.is_file():
            raise FileNotFoundError(f"image {str(path)!r} listed in the split file does not exist")
        image = Image.open(path).convert("RGB")
        return (self.transform(image) if self.transform else image), label


def clip_transform(image_size: int, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                   train: bool = False) -> Callable:
    """CLIP's preprocessing (bicubic resize + center crop, CLIP mean/std); ``train`` adds CLIP-SVD's
    RandomResizedCrop (scale 0.08-1) and horizontal flip."""
    from torchvision import transforms as T

    if train:
        geometry = [T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return T.Compose(geometry + [T.ToTensor(), T.Normalize(mean, std)])


