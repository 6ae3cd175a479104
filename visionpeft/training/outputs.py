"""The files a run writes (the adapter, summary, metrics, recipe, progress, curves), each written atomically."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from visionpeft.io import atomic_write


def write_json(path: str | Path, payload: Any) -> Path:
    """``payload`` as indented JSON."""
    text = json.dumps(payload, indent=2)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_csv(path: str | Path, rows: list[dict], fields: list[str]) -> Path:
    """``rows`` as a CSV file with the header ``fields``."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """Training loss and evaluation top-1 against the step, side by side."""
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def save_trained(model, recipe: dict[str, Any], output: Path, accelerator) -> None:
    """The adapter (``vp.save``), or a baseline's trained tensors, into ``output/adapter``. Called on every process:
    a sharded model's tensors are gathered by all of them and written by rank 0; otherwise the main process writes."""
    import visionpeft as vp
    from visionpeft.distributed import any_sharded, gathered, written_on_rank_zero
    from visionpeft.training.recipe import BASELINES

    sharded = any_sharded(dict(model.named_parameters()))
    if not sharded and not accelerator.is_main_process:
        return
    if recipe["adapter"]["method"] not in BASELINES:
        vp.save(model, output / "adapter")
        return
    from safetensors.torch import save_file

    tensors = gathered({n: p for n, p in model.named_parameters() if p.requires_grad})

    def write() -> None:
        (output / "adapter").mkdir(exist_ok=True)
        atomic_write(output / "adapter" / "trained.safetensors", lambda tmp: save_file(tensors, tmp))

    written_on_rank_zero(sharded, write)
