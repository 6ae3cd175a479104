"""Checkpoints that know what they were trained on, and the decision to resume, reuse or start fresh.

A checkpoint (``<output>/checkpoints/step_<N>``) holds accelerate's state (the trainable parameters and the
buffers of each model, optimizer, scheduler, RNG) and ``progress.json``: the step, the history so far and the
run's *fingerprint*, every recipe setting that changes what the run computes (task, model, method, options,
seed, lr, schedule, ...) with their hash. ``summary.json`` of a finished run carries the same fingerprint.

``train.resume``:

- ``auto``: a finished run with the same fingerprint is reported and reused; else the latest checkpoint with the
  same fingerprint is resumed; else the run starts fresh. A run of other settings in the folder is refused with
  the keys that differ, never resumed silently.
- ``never`` / ``restart`` / null: start fresh (the folder's checkpoints of an earlier run are removed).
- a path: resume that checkpoint (it must have the same fingerprint).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from visionpeft.training.outputs import write_json

CHECKPOINTS = "checkpoints"
FRESH_MODES = (None, "never", "restart")
#: recipe keys that do not change what a run computes: a run resumes or is reused under other values of these
NEUTRAL_KEYS = ("output", "train.resume", "train.checkpoint_interval", "train.keep_checkpoints",
                "train.log_interval", "train.eval_batch_size", "train.device", "data.num_workers")


# --- the fingerprint ----------------------------------------------------------------------------
def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def fingerprint(recipe: dict[str, Any]) -> dict[str, Any]:
    """What a run is trained on: the named essentials and every setting that changes the result, with its hash."""
    settings = {k: v for k, v in flatten(recipe).items() if k not in NEUTRAL_KEYS}
    canonical = json.dumps(settings, sort_keys=True, default=str)
    model, adapter, data, train = (recipe.get(s, {}) for s in ("model", "adapter", "data", "train"))
    return {
        "recipe_sha256": hashlib.sha256(canonical.encode()).hexdigest(),
        "task": data.get("task") or recipe.get("task"),
        "model": model.get("name") or model.get("pretrained"),
        "method": adapter.get("method"),
        "options": adapter.get("options"),
        "seed": train.get("seed"),
        "lr": train.get("lr"),
        "settings": json.loads(canonical),
    }


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each setting that differs between two fingerprints."""
    old, new = saved.get("settings", {}), current["settings"]
    missing = object()
    return [f"{key}: {old.get(key, missing)!r} there, {new.get(key, missing)!r} now".replace(repr(missing), "unset")
            for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)]


def check_same_run(saved: dict[str, Any] | None, recipe: dict[str, Any], where: Path) -> None:
    """A ValueError unless ``saved`` (a fingerprint read from ``where``) is the fingerprint of ``recipe``."""
    how = (f"to start fresh, give another output= or train.resume=never (which discards the run in "
           f"{recipe['output']!r})")
    if not saved:
        raise ValueError(f"{str(where)!r} records no settings, so it cannot be checked against this recipe; {how}")
    current = fingerprint(recipe)
    if saved.get("recipe_sha256") != current["recipe_sha256"]:
        changed = differences(saved, current) or ["the recipe hash"]
        raise ValueError(f"{str(where)!r} is a run with other settings ({'; '.join(changed)}); "
                         f"it is not resumed under changed settings; {how}")


# --- the decision -------------------------------------------------------------------------------
@dataclass
class Plan:
    """What ``train`` does in its output folder: ``fresh``, ``resume`` a checkpoint, or report ``finished``."""
    action: str
    checkpoint: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def message(self) -> str:
        if self.action == "resume":
            return f"resumed from step {self.progress()['step']} ({self.checkpoint})"
        if self.action == "finished":
            return (f"the run in {self.summary.get('output')!r} is finished ({self.summary.get('steps')} steps); "
                    f"train.resume=restart trains it again")
        return "no checkpoint to resume, starting fresh"

    def progress(self) -> dict[str, Any]:
        return json.loads((self.checkpoint / "progress.json").read_text())


def finished_run(recipe: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of a finished run of ``recipe`` in its output folder (None if there is none); a finished run
    of other settings there is a ValueError naming what differs."""
    path = Path(recipe["output"]) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    check_same_run(summary.get("fingerprint"), recipe, path)
    return summary | {"output": recipe["output"]}


def plan(recipe: dict[str, Any]) -> Plan:
    """Decide before anything in the output folder changes (so a refusal leaves it as it was)."""
    mode = recipe["train"].get("resume")
    if mode in FRESH_MODES:
        return Plan("fresh")
    if mode == "auto":
        summary = finished_run(recipe)
        if summary is not None:
            return Plan("finished", summary=summary)
        checkpoint = latest_checkpoint(Path(recipe["output"]))
        if checkpoint is None:
            return Plan("fresh")
    else:
        checkpoint = Path(mode)
        if not (checkpoint / "progress.json").is_file():
            raise FileNotFoundError(f"train.resume checkpoint {str(checkpoint)!r} does not exist")
    progress = json.loads((checkpoint / "progress.json").read_text())
    check_same_run(progress.get("fingerprint"), recipe, checkpoint)
    return Plan("resume", checkpoint=checkpoint)


def start_fresh(output: Path) -> None:
    """Remove what an earlier run left that a fresh one would otherwise mix with: checkpoints and the summary."""
    shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
    (output / "summary.json").unlink(missing_ok=True)


# --- writing and finding checkpoints ------------------------------------------------------------
def latest_checkpoint(output: Path) -> Path | None:
    folder = output / CHECKPOINTS
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name))]
    return max(steps)[1] if steps else None


def save_checkpoint(accelerator, output: Path, progress: dict[str, Any], keep: int | None,
                    also: Callable[[Path], None] | None = None) -> Path:
    """accelerate's state plus ``progress`` (step, history, fingerprint, ...), written to a temporary folder and
    renamed into place; then all but the newest ``keep`` checkpoints are removed (None keeps all). ``also(folder)``,
    called on every process, writes more into the temporary folder (the state of a model accelerate does not hold)."""
    step = progress["step"]
    final = output / CHECKPOINTS / f"step_{step}"
    staging = output / CHECKPOINTS / f".step_{step}.tmp"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if also is not None:
        also(staging)
    if accelerator.is_main_process:
        write_json(staging / "progress.json", progress)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        if keep is not None:
            older = sorted((int(p.name.split("_")[1]), p) for p in (output / CHECKPOINTS).iterdir()
                           if re.fullmatch(r"step_\d+", p.name))
            for _, path in older[:-keep]:
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def trained_state_keys(model, state) -> set[str]:
    """The keys of ``state`` (the model's state dict) a checkpoint keeps: the trainable parameters, the buffers and
    every adapter tensor; the frozen base is rebuilt identically from the recipe (seeded)."""
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    keep |= {name for name, _ in model.named_buffers()}
    return {key for key in state if key in keep or ".vp_adapters." in f".{key}"}


def keep_trainable_state(accelerator) -> None:
    """Checkpoints hold what training changes (:func:`trained_state_keys`), so a checkpoint of a ViT-B adapter is
    megabytes, not the backbone. Load with ``accelerator.load_state(path, strict=False)``."""
    def hook(models, weights, _output_dir) -> None:
        for model, state in zip(models, weights):
            keep = trained_state_keys(model, state)
            for key in [k for k in state if k not in keep]:
                del state[key]

    accelerator.register_save_state_pre_hook(hook)
