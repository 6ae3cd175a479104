"""The recipe runner on accelerate: one code path from a CPU to many GPUs (``accelerate launch`` / torchrun).

``train(recipe)`` builds the timm model and the adapter (:mod:`~visionpeft.training.backbone`), trains with AdamW,
warm-up + cosine, mixed precision and gradient accumulation, calls ``vp.regularization`` and ``vp.step`` every step,
evaluates, checkpoints atomically (at each evaluation by default; :mod:`~visionpeft.training.checkpoints` decides
whether to resume, reuse a finished run or start fresh, by the run's fingerprint; a resumed run ends with the same
weights as an uninterrupted one), stops cleanly on Ctrl-C, and writes ``metrics.csv``, ``summary.json``,
``curves.png`` and the adapter (``vp.save``) into the output directory. ``train.batch_size`` is the global batch:
with several processes each gets its share of every batch (accelerate's ``split_batches``). With ``train.fsdp``
the model is sharded with FSDP2 after the adapter is attached (:mod:`~visionpeft.training.fsdp`).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import visionpeft as vp
from visionpeft.data import build_dataset, build_transform
from visionpeft.training import checkpoints, fsdp
from visionpeft.training.alpha_steps import AlphaSteps, split_holdout
from visionpeft.training.backbone import (  # noqa: F401  (re-exported: the runner's public helpers)
    TINY_PREFIX, apply_adapter, attach_peft_lora, build_model, compile_model, head_name, load_checkpoint, param_groups,
)
from visionpeft.training.checkpoints import CHECKPOINTS, latest_checkpoint  # noqa: F401
from visionpeft.training.interrupt import StopRequest, TrainingInterrupted, resume_hint
from visionpeft.training.launch import make_accelerator, peak_memory_mb, progress_enabled, runner_shards  # noqa: F401
from visionpeft.training.outputs import plot_curves, save_trained, write_csv, write_json  # noqa: F401
from visionpeft.training.recipe import BASELINES
from visionpeft.training.schedule import EpochOrder, check_batch_fits, lr_lambda, updates_per_epoch  # noqa: F401


# --- data and evaluation ------------------------------------------------------------------------
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
    if not Path(data["root"]).is_dir():
        from visionpeft.data.mini_vtab import MINI_TASKS

        hint = ""
        if data["format"] == "vtab1k" and data["task"] in MINI_TASKS:
            hint = (f" (write the mini VTAB tasks there: python -c \"from visionpeft.data.mini_vtab import "
                    f"write_mini_vtab; write_mini_vtab('{data['root']}')\")")
        raise FileNotFoundError(f"data.root {data['root']!r} does not exist{hint}")
    train_tf = build_transform(data["augmentation"], spec["image_size"], spec["mean"], spec["std"], train=True)
    eval_tf = build_transform(data["augmentation"], spec["image_size"], spec["mean"], spec["std"], train=False)
    return build_dataset(data, data["train_split"], train_tf), build_dataset(data, data["eval_split"], eval_tf)


def describe_data(data: dict[str, Any]) -> str:
    return f"data.task={data['task']}" if data["task"] else f"data.root={data['root']!r}"


# --- training -----------------------------------------------------------------------------------
def train(recipe: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Run a validated recipe (see :mod:`visionpeft.training.recipe`); returns the summary.

    Ctrl-C stops at the next step boundary, writes a checkpoint and raises :class:`TrainingInterrupted`, whose
    message says how to resume."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg = recipe["train"]
    output = Path(recipe["output"])
    decision = checkpoints.plan(recipe)  # before anything in the output folder changes
    sharded = runner_shards(recipe)
    accelerator = make_accelerator(recipe, shards=sharded)
    if decision.action == "finished":
        accelerator.print(decision.message)
        return decision.summary
    set_seed(cfg["seed"])
    train_set, eval_set = datasets(recipe)
    holdout = None
    if recipe["data"]["alpha_holdout"] is not None:
        train_set, holdout = split_holdout(train_set, recipe["data"]["alpha_holdout"], cfg["seed"])
    check_batch_fits(len(train_set), cfg["batch_size"], describe_data(recipe["data"]))
    if cfg["batch_size"] % accelerator.num_processes:
        raise ValueError(f"train.batch_size={cfg['batch_size']} must be divisible by the {accelerator.num_processes} processes")
    model = build_model(recipe, train_set.num_classes)
    units = fsdp.shard_units(model) if sharded else []
    model = apply_adapter(model, recipe["adapter"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if sharded:  # after attach, before the optimizer: the parameters become DTensors
        model = fsdp.shard(model, units, accelerator.device, accelerator.mixed_precision)
    alpha = None if holdout is None else AlphaSteps(model, holdout, recipe["adapter"]["options"], cfg["batch_size"],
                                                    cfg["seed"])
    groups = param_groups(model, cfg["weight_decay"], cfg["no_decay"], exclude=alpha.ids() if alpha else ())
    clipped = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg["lr"])
    if cfg["compile"]:  # lazy: compiles at the first forward (checkpoint keys then carry _orig_mod.)
        model = compile_model(model, accelerator.device.type)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        if decision.action == "fresh":
            checkpoints.start_fresh(output)
        (output / CHECKPOINTS).mkdir(exist_ok=True)
        write_json(output / "recipe.json", recipe)
    accelerator.wait_for_everyone()
    order = EpochOrder(len(train_set), cfg["seed"])
    train_loader = DataLoader(train_set, batch_size=cfg["batch_size"], sampler=order, drop_last=True,
                              num_workers=recipe["data"]["num_workers"], generator=torch.Generator())  # not the global RNG
    eval_loader = DataLoader(eval_set, batch_size=cfg["eval_batch_size"] or cfg["batch_size"],
                             num_workers=recipe["data"]["num_workers"])
    per_epoch = updates_per_epoch(len(train_loader), cfg["grad_accum"])
    total_steps = cfg["steps"] or cfg["epochs"] * per_epoch
    warmup_steps = int(round(cfg["warmup_epochs"] * per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg["lr"], cfg["warmup_lr"], cfg["min_lr"], warmup_steps, total_steps))
    if sharded:  # accelerate never wraps the sharded model, nor holds its optimizer (fsdp.py says why)
        train_loader, eval_loader, scheduler = accelerator.prepare(train_loader, eval_loader, scheduler)
    else:
        model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, eval_loader, scheduler)
    if alpha is not None:
        alpha.optimizer = accelerator.prepare(alpha.optimizer)
    checkpoints.keep_trainable_state(accelerator)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)

    def save_sharded(folder: Path) -> None:
        fsdp.save_state(raw_model, optimizer, folder, checkpoints.trained_state_keys(raw_model, raw_model.state_dict()))

    step, history, best = 0, [], None
    if decision.action == "resume":
        accelerator.load_state(str(decision.checkpoint), strict=False)
        if sharded:
            fsdp.load_state(raw_model, optimizer, decision.checkpoint)
        state = decision.progress()
        step, history, best = state["step"], state["history"], state["best_top1"]
    if cfg["resume"] not in checkpoints.FRESH_MODES:
        accelerator.print(decision.message)
    fingerprint = checkpoints.fingerprint(recipe)
    last_saved = decision.checkpoint

    def save(at_step: int) -> Path:
        progress_state = {"step": at_step, "history": history, "best_top1": best, "fingerprint": fingerprint}
        return checkpoints.save_checkpoint(accelerator, output, progress_state, cfg["keep_checkpoints"],
                                           also=save_sharded if sharded else None)

    eval_every = cfg["eval_interval"] * (per_epoch if cfg["epochs"] else 1)
    epochs_total = -(-total_steps // per_epoch)
    interval = cfg["checkpoint_interval"]
    step_times: list[float] = []
    bar = tqdm(total=total_steps, initial=step, desc=f"{recipe['adapter']['method']}", unit="step",
               disable=not progress_enabled(progress, accelerator))
    model.train()
    window_loss, window_images, window_start = [], 0, time.perf_counter()
    with StopRequest() as stop:
        try:
            while step < total_steps:
                epoch = step // per_epoch
                train_loader.set_epoch(epoch)  # accelerate passes its own epoch count to the sampler at each pass
                done_in_epoch = (step - epoch * per_epoch) * cfg["grad_accum"]
                batches = accelerator.skip_first_batches(train_loader, done_in_epoch) if done_in_epoch else train_loader
                epoch_start = step
                try:
                    for images, labels in batches:
                        with accelerator.accumulate(model):
                            logits = model(images)
                            loss = (F.cross_entropy(logits, labels, label_smoothing=cfg["label_smoothing"])
                                    + vp.regularization(raw_model))
                            accelerator.backward(loss)
                            # stepped here only at the end of an accumulation (a prepared optimizer would skip the
                            # others itself; the sharded run's optimizer is not prepared)
                            if accelerator.sync_gradients:
                                if cfg["grad_clip"]:
                                    accelerator.clip_grad_norm_(clipped, cfg["grad_clip"])
                                optimizer.step()
                                vp.step(raw_model, step + 1, total_steps)  # after the update, before grads are cleared
                            scheduler.step()
                            if accelerator.sync_gradients:
                                optimizer.zero_grad(set_to_none=True)
                        window_loss.append(accelerator.gather(loss.detach()[None]).mean().item())
                        window_images += images.shape[0] * accelerator.num_processes
                        if not accelerator.sync_gradients:
                            continue
                        step += 1
                        alpha_loss = alpha and alpha.run(model, accelerator, step, cfg["label_smoothing"], optimizer)
                        seconds = time.perf_counter() - window_start  # training only: evaluation comes after
                        step_times.append(seconds)
                        bar.update()
                        lr = scheduler.get_last_lr()[0]
                        record = {"step": step, "epoch": step / per_epoch, "loss": statistics.mean(window_loss),
                                  "lr": lr, "images_per_s": window_images / seconds if seconds > 0 else 0.0,
                                  "top1": None} | ({"alpha_loss": alpha_loss} if alpha else {})
                        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.1e}", img_s=f"{record['images_per_s']:.0f}")
                        window_loss, window_images = [], 0
                        last_epochs = cfg["epochs"] and step > (epochs_total - cfg["eval_last"]) * per_epoch
                        if step % eval_every == 0 or step == total_steps or (last_epochs and step % per_epoch == 0):
                            record["top1"] = evaluate(model, eval_loader, accelerator)
                            best = record["top1"] if best is None else max(best, record["top1"])
                            if not bar.disable:
                                bar.write(f"step {step}: top-1 {record['top1']:.2f}% (best {best:.2f}%)")
                        history.append(record)
                        due = record["top1"] is not None if interval == "eval" else bool(interval) and step % interval == 0
                        if due and step < total_steps:
                            last_saved = save(step)
                        if step < total_steps and stop.requested(accelerator):
                            if last_saved is None or last_saved.name != f"step_{step}":
                                last_saved = save(step)
                            raise TrainingInterrupted(resume_hint(step, last_saved))
                        window_start = time.perf_counter()
                        if step >= total_steps or step % per_epoch == 0:
                            break
                except RuntimeError:
                    # DataLoader workers take the Ctrl-C too and exit; the run is between optimizer steps
                    if not stop.flag or accelerator.num_processes > 1:
                        raise
                    if step and (last_saved is None or last_saved.name != f"step_{step}"):
                        last_saved = save(step)
                    raise TrainingInterrupted(resume_hint(step, last_saved)) from None
                if step == epoch_start:  # cannot happen with full batches; never loop without progress
                    raise RuntimeError(f"an epoch of {len(train_loader)} batches gave no optimizer step at step {step}")
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread's handler
            raise TrainingInterrupted(resume_hint(None, latest_checkpoint(output))) from None
        finally:
            bar.close()
    accelerator.wait_for_everyone()
    save_trained(raw_model, recipe, output, accelerator)  # every process: a sharded model is gathered
    summary = {}
    if accelerator.is_main_process:
        summary = finish(recipe, output, history, best, trainable, step_times, accelerator, sharded)
    accelerator.wait_for_everyone()
    return summary


def alpha_run(history: list[dict]) -> bool:
    return bool(history) and "alpha_loss" in history[0]


def finish(recipe: dict[str, Any], output: Path, history: list, best: float | None, trainable: int,
           step_times: list[float], accelerator, sharded: bool = False) -> dict[str, Any]:
    method = recipe["adapter"]["method"]
    evaluated = [r for r in history if r["top1"] is not None]
    fields = ["step", "epoch", "loss", "lr", "images_per_s", "top1"] + (["alpha_loss"] if alpha_run(history) else [])
    write_csv(output / "metrics.csv", history, fields)
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
        "fsdp": sharded,
        "output": str(output),
        "fingerprint": checkpoints.fingerprint(recipe),
    }
    plot_curves(history, output / "curves.png", title=f"{method} on {recipe['data'].get('task') or recipe['data']['root']}")
    write_json(output / "summary.json", summary)  # last: a summary marks a finished run
    return summary


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
