"""The recipe runner on accelerate: one code path from a CPU to many GPUs (``accelerate launch`` / torchrun).

``train(recipe)`` builds the timm model and the adapter, trains with AdamW, warm-up + cosine, mixed
precision and gradient accumulation, calls ``vp.regularization`` and ``vp.step`` every step, evaluates,
checkpoints atomically every N steps (``train.resume=auto`` continues from the last one and ends with
the same weights as an uninterrupted run), and writes ``metrics.csv``, ``summary.json``, ``curves.png``
and the adapter (``vp.save``) into the output directory. ``train.batch_size`` is the global batch: with
several processes each gets its share of every batch (accelerate's ``split_batches``).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import visionpeft as vp
from visionpeft.data import build_dataset, build_transform
from visionpeft.training.outputs import write_csv, write_json
from visionpeft.training.recipe import BASELINES

CHECKPOINTS = "checkpoints"


# --- model --------------------------------------------------------------------------------------
TINY_PREFIX = "visionpeft/tiny_"


def build_model(recipe: dict[str, Any], num_classes: int) -> nn.Module:
    """The timm backbone of the recipe, with ``pretrained`` weights or a local checkpoint.

    ``visionpeft/tiny_vit`` and ``visionpeft/tiny_convnet`` name the tiny backbones shipped with the
    package (:func:`visionpeft.models.tiny`); any other name is a timm model name.
    """
    spec = recipe["model"]
    classes = spec["num_classes"] if spec["num_classes"] is not None else num_classes
    if spec["name"].startswith(TINY_PREFIX):
        from visionpeft.models.tiny import tiny

        if spec["kwargs"]:
            raise ValueError(f"model.kwargs must be empty for {spec['name']!r}, got {spec['kwargs']!r}")
        model = tiny(spec["name"][len(TINY_PREFIX):], num_classes=classes, pretrained=spec["pretrained"])
    else:
        import timm

        model = timm.create_model(spec["name"], pretrained=spec["pretrained"], num_classes=classes, **spec["kwargs"])
    if spec["checkpoint"]:
        load_checkpoint(model, spec["checkpoint"])
    return model


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Weights from a local file: ``.npz`` (original ViT), ``.safetensors``, or a torch file of tensors."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model.checkpoint {path!r} does not exist")
    if file.suffix == ".npz":
        import timm

        timm.models.load_checkpoint(model, str(file), strict=False)
        return
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"model.checkpoint {path!r} has no tensor that fits {type(model).__name__}")
    model.load_state_dict(usable, strict=False)


def head_name(model: nn.Module) -> str:
    getter = getattr(model, "get_classifier", None)
    if getter is not None:
        head = getter()
        for name, module in model.named_modules():
            if module is head and name:
                return name
    return "head"


def apply_adapter(model: nn.Module, adapter: dict[str, Any]) -> nn.Module:
    method = adapter["method"]
    unfreeze = [head_name(model) if u == "head" else u for u in adapter["unfreeze"]]
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method in ("linear", "peft-lora"):
        for p in model.parameters():
            p.requires_grad_(False)
        if method == "peft-lora":
            model = attach_peft_lora(model, adapter)
        modules = dict(model.named_modules())
        for name in unfreeze:
            modules[name].requires_grad_(True)
        return model
    return vp.attach(model, method, targets=adapter["targets"], unfreeze=unfreeze, **adapter["options"])


def attach_peft_lora(model: nn.Module, adapter: dict[str, Any]) -> nn.Module:
    """Hugging Face PEFT's LoRA as an outside peer, on exactly the layers visionpeft's LoRA would adapt
    (``adapter.targets`` resolved by visionpeft, family preset included); with ``options.use_dora``, PEFT's DoRA
    (LoRA's factors and a trained magnitude per output channel) on those layers."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("adapter.method='peft-lora' needs Hugging Face PEFT: pip install peft") from None
    from visionpeft.targeting import resolve_targets

    options = {"rank": 8, "alpha": None, "dropout": 0.0, "use_dora": False} | adapter["options"]
    label = "peft-dora" if options["use_dora"] else "peft-lora"
    targets = resolve_targets(model, adapter["targets"])
    # PEFT adapts a grouped conv only when the rank is divisible by its groups (depthwise convs never, at small
    # ranks); those layers stay frozen in this baseline, and the run says so
    unsupported = [t.name for t in targets if getattr(t.module, "groups", 1) > 1 and options["rank"] % t.module.groups]
    if unsupported:
        warnings.warn(f"{label}: PEFT cannot adapt {len(unsupported)} grouped conv(s) at rank {options['rank']} "
                      f"(e.g. {unsupported[0]!r}); they stay frozen in this baseline")
    names = [t.name for t in targets if t.name not in unsupported]
    config = LoraConfig(r=options["rank"], lora_alpha=options["alpha"] or options["rank"],
                        lora_dropout=options["dropout"], target_modules=names, use_dora=bool(options["use_dora"]))
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)  # lora_A, lora_B and DoRA's lora_magnitude_vector
    return model


def param_groups(model: nn.Module, weight_decay: float, rules: list[str]) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay for parameters matching a rule (a name fragment, or "1d" for ≤1-D)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = any((rule == "1d" and param.ndim <= 1) or (rule != "1d" and rule in name) for rule in rules)
        (no_decay if skip else decay).append(param)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def lr_lambda(lr: float, warmup_lr: float, min_lr: float, warmup_steps: int, total_steps: int):
    """Linear warm-up from warmup_lr to lr, then cosine to min_lr (as a factor of lr, for LambdaLR)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (warmup_lr + (lr - warmup_lr) * step / warmup_steps) / lr
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))) / lr

    return factor


# --- data order ---------------------------------------------------------------------------------
class EpochOrder(torch.utils.data.Sampler):
    """A permutation drawn from (seed, epoch): the same on every process and after a resume."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


# --- checkpoints --------------------------------------------------------------------------------
def latest_checkpoint(output: Path) -> Path | None:
    folder = output / CHECKPOINTS
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name))]
    return max(steps)[1] if steps else None


# --- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator) -> float:
    model.eval()
    correct = torch.zeros((), device=accelerator.device)
    total = torch.zeros((), device=accelerator.device)
    for images, labels in loader:
        prediction = model(images).argmax(-1)
        prediction, labels = accelerator.gather_for_metrics((prediction, labels))
        correct += (prediction == labels).sum()
        total += labels.numel()
    model.train()
    return 100.0 * correct.item() / max(total.item(), 1)


def datasets(recipe: dict[str, Any]) -> tuple[Dataset, Dataset]:
    data, spec = recipe["data"], recipe["model"]
    train_tf = build_transform(data["augmentation"], spec["image_size"], spec["mean"], spec["std"], train=True)
    eval_tf = build_transform(data["augmentation"], spec["image_size"], spec["mean"], spec["std"], train=False)
    return build_dataset(data, data["train_split"], train_tf), build_dataset(data, data["eval_split"], eval_tf)


def make_accelerator(recipe: dict[str, Any]):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    # accelerate keeps one global state per process; a sweep or a notebook runs several recipes (with other
    # precisions) in one process, so start each from a clean state (the process group itself is kept)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    train = recipe["train"]
    return Accelerator(mixed_precision=train["precision"], gradient_accumulation_steps=train["grad_accum"],
                       cpu=train["device"] == "cpu", dataloader_config=DataLoaderConfiguration(split_batches=True))


# --- training -----------------------------------------------------------------------------------
def train(recipe: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Run a validated recipe (see :mod:`visionpeft.training.recipe`); returns the summary."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg = recipe["train"]
    accelerator = make_accelerator(recipe)
    output = Path(recipe["output"])
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / CHECKPOINTS).mkdir(exist_ok=True)
        write_json(output / "recipe.json", recipe)
    set_seed(cfg["seed"])
    train_set, eval_set = datasets(recipe)
    model = apply_adapter(build_model(recipe, train_set.num_classes), recipe["adapter"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"], cfg["no_decay"]), lr=cfg["lr"])
    if cfg["batch_size"] % accelerator.num_processes:
        raise ValueError(f"train.batch_size={cfg['batch_size']} must be divisible by the {accelerator.num_processes} processes")
    micro_batch = cfg["batch_size"]
    order = EpochOrder(len(train_set), cfg["seed"])
    train_loader = DataLoader(train_set, batch_size=micro_batch, sampler=order, drop_last=True,
                              num_workers=recipe["data"]["num_workers"])
    eval_loader = DataLoader(eval_set, batch_size=cfg["eval_batch_size"] or cfg["batch_size"],
                             num_workers=recipe["data"]["num_workers"])
    updates_per_epoch = max(1, len(train_loader) // cfg["grad_accum"])
    total_steps = cfg["steps"] or cfg["epochs"] * updates_per_epoch
    warmup_steps = int(round(cfg["warmup_epochs"] * updates_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg["lr"], cfg["warmup_lr"], cfg["min_lr"], warmup_steps, total_steps))
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)
    raw_model = accelerator.unwrap_model(model)

    step, history, best = 0, [], None
    resume = cfg["resume"]
    checkpoint = latest_checkpoint(output) if resume == "auto" else (Path(resume) if resume else None)
    if checkpoint is not None:
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"train.resume checkpoint {str(checkpoint)!r} does not exist")
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "progress.json").read_text())
        step, history, best = state["step"], state["history"], state["best_top1"]
        accelerator.print(f"resumed from {checkpoint} at step {step}")

    eval_every = cfg["eval_interval"] * (updates_per_epoch if cfg["epochs"] else 1)
    epochs_total = math.ceil(total_steps / updates_per_epoch)
    step_times: list[float] = []
    bar = tqdm(total=total_steps, initial=step, desc=f"{recipe['adapter']['method']}", unit="step",
               disable=not (progress and accelerator.is_local_main_process))
    model.train()
    window_loss, window_images, window_start = [], 0, time.perf_counter()
    while step < total_steps:
        epoch = step // updates_per_epoch
        order.epoch = epoch
        done_in_epoch = (step - epoch * updates_per_epoch) * cfg["grad_accum"]
        batches = accelerator.skip_first_batches(train_loader, done_in_epoch) if done_in_epoch else train_loader
        for images, labels in batches:
            with accelerator.accumulate(model):
                logits = model(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=cfg["label_smoothing"]) + vp.regularization(raw_model)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg["grad_clip"]:
                    accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
                optimizer.step()
                if accelerator.sync_gradients:
                    vp.step(raw_model, step + 1, total_steps)  # after the update, before grads are cleared
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window_loss.append(accelerator.gather(loss.detach()[None]).mean().item())
            window_images += images.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            seconds = time.perf_counter() - window_start
            step_times.append(seconds)
            bar.update()
            lr = scheduler.get_last_lr()[0]
            record = {"step": step, "epoch": step / updates_per_epoch, "loss": statistics.mean(window_loss), "lr": lr,
                      "images_per_s": window_images / seconds if seconds > 0 else 0.0, "top1": None}
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.1e}", img_s=f"{record['images_per_s']:.0f}")
            window_loss, window_images, window_start = [], 0, time.perf_counter()
            last_epochs = cfg["epochs"] and step > (epochs_total - cfg["eval_last"]) * updates_per_epoch
            if step % eval_every == 0 or step == total_steps or (last_epochs and step % updates_per_epoch == 0):
                record["top1"] = evaluate(model, eval_loader, accelerator)
                best = record["top1"] if best is None else max(best, record["top1"])
                if not bar.disable:
                    bar.write(f"step {step}: top-1 {record['top1']:.2f}% (best {best:.2f}%)")
            history.append(record)
            if cfg["checkpoint_interval"] and step % cfg["checkpoint_interval"] == 0 and step < total_steps:
                save_checkpoint(accelerator, output, step, history, best)
            if step >= total_steps or step % updates_per_epoch == 0:
                break
    bar.close()
    accelerator.wait_for_everyone()
    summary = {}
    if accelerator.is_main_process:
        summary = finish(raw_model, recipe, output, history, best, trainable, step_times, accelerator)
    accelerator.wait_for_everyone()
    return summary


def save_checkpoint(accelerator, output: Path, step: int, history: list, best: float | None) -> None:
    """accelerate's state plus our progress, written to a temporary folder and renamed into place."""
    final = output / CHECKPOINTS / f"step_{step}"
    staging = output / CHECKPOINTS / f".step_{step}.tmp"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        write_json(staging / "progress.json", {"step": step, "history": history, "best_top1": best})
        os.replace(staging, final)
    accelerator.wait_for_everyone()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def finish(model: nn.Module, recipe: dict[str, Any], output: Path, history: list, best: float | None,
           trainable: int, step_times: list[float], accelerator) -> dict[str, Any]:
    method = recipe["adapter"]["method"]
    if method in BASELINES:
        from safetensors.torch import save_file

        from visionpeft.io import atomic_write

        (output / "adapter").mkdir(exist_ok=True)
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        atomic_write(output / "adapter" / "trained.safetensors", lambda tmp: save_file(tensors, tmp))
    else:
        vp.save(model, output / "adapter")
    evaluated = [r for r in history if r["top1"] is not None]
    write_csv(output / "metrics.csv", history, ["step", "epoch", "loss", "lr", "images_per_s", "top1"])
    summary = {
        "method": method,
        "task": recipe["data"].get("task"),
        "trainable_parameters": trainable,
        "final_top1": evaluated[-1]["top1"] if evaluated else None,
        "best_of_eval_top1": best,
        "step_time_s": statistics.median(step_times) if step_times else None,
        "peak_memory_mb": peak_memory_mb(accelerator.device),
        "steps": history[-1]["step"] if history else 0,
        "processes": accelerator.num_processes,
    }
    write_json(output / "summary.json", summary)
    plot_curves(history, output / "curves.png", title=f"{method} on {recipe['data'].get('task') or recipe['data']['root']}")
    return summary


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([r["step"] for r in history], [r["loss"] for r in history], color="tab:blue")
    left.set(xlabel="step", ylabel="training loss", title="loss")
    evaluated = [r for r in history if r["top1"] is not None]
    right.plot([r["step"] for r in evaluated], [r["top1"] for r in evaluated], marker="o", color="tab:green")
    right.set(xlabel="step", ylabel="top-1 (%)", title="evaluation")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_adapter(recipe: dict[str, Any], adapter_dir: str) -> float:
    """Top-1 of a saved adapter (``visionpeft eval``) on the recipe's evaluation split."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(recipe)
    set_seed(recipe["train"]["seed"])  # the same base weights as training when the backbone is not pretrained
    _, eval_set = datasets(recipe)
    model = build_model(recipe, eval_set.num_classes)
    if recipe["adapter"]["method"] == "peft-lora":
        model = apply_adapter(model, recipe["adapter"])
    directory = Path(adapter_dir)
    trained = directory / "trained.safetensors"
    if trained.is_file():
        from safetensors.torch import load_file

        state = load_file(str(trained))
        own = model.state_dict()
        bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise ValueError(f"{str(trained)!r} does not fit this model: {bad[:5]}")
        model.load_state_dict(state, strict=False)
    else:
        vp.load(model, directory)
    loader = DataLoader(eval_set, batch_size=recipe["train"]["eval_batch_size"] or recipe["train"]["batch_size"])
    model, loader = accelerator.prepare(model, loader)
    return evaluate(model, loader, accelerator)
