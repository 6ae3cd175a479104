"""Write images into the benchmarks' on-disk formats (prepare scripts, generated tasks, tests)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


def write_vtab_task(root: str | Path, task: str, splits: dict[str, tuple[Sequence[np.ndarray], Sequence[int]]]) -> Path:
    """``<root>/<task>/images/<split>/NNNNNN.png`` and ``<root>/<task>/<split>.txt`` (``path label`` lines).

    ``splits`` maps a split name (train800, val200, train800val200, test) to (uint8 H×W×3 images, labels).
    """
    from PIL import Image

    folder = Path(root) / task
    for split, (images, labels) in splits.items():
        image_dir = folder / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for index, (image, label) in enumerate(zip(images, labels)):
            relative = f"images/{split}/{index:06d}.png"
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(folder / relative)
            lines.append(f"{relative} {int(label)}")
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


def write_fgvc_split(folder: str | Path, split: str, entries: Iterable[tuple[str, int]]) -> Path:
    """A VPT-style ``<split>.json``: one object mapping relative image path → class id."""
    path = Path(folder) / f"{split}.json"
    path.write_text(json.dumps({name: int(label) for name, label in entries}, indent=0))
    return path
