"""Turn the benchmarks' distributed archives into the layouts the loaders read, and check them.

Extraction goes to a temporary folder beside the destination, which is renamed into place only after
every list/split file has been checked against the images, so a failed prepare leaves nothing half-made.
"""
from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

from visionpeft.data.formats import FGVC_DATASETS, VTAB_SPLITS, VTAB_TASKS

_ALIAS_TO_TASK = {alias: task for task, (_, _, aliases) in VTAB_TASKS.items() for alias in aliases}


def extract(archive: str | Path, into: Path) -> None:
    """Unpack a .zip, .tar, .tar.gz/.tgz archive (or copy a folder) into ``into``, refusing unsafe paths."""
    archive = Path(archive)
    if archive.is_dir():
        shutil.copytree(archive, into, dirs_exist_ok=True)
        return
    if not archive.is_file():
        raise FileNotFoundError(f"archive {str(archive)!r} does not exist")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            _check_members(archive, zf.namelist())
            zf.extractall(into)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            _check_members(archive, tf.getnames())
            tf.extractall(into, filter="data")
    else:
        raise ValueError(f"{str(archive)!r} is neither a zip nor a tar archive nor a folder")


def _check_members(archive: Path, names: list[str]) -> None:
    bad = [n for n in names if n.startswith("/") or ".." in Path(n).parts]
    if bad:
        raise ValueError(f"{str(archive)!r} has unsafe member paths, e.g. {bad[0]!r}")


def _commit(staging: Path, destination: Path) -> None:
    if destination.exists():
        raise FileExistsError(f"{str(destination)!r} already exists; remove it or choose another --out")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(destination)


def check_vtab_task(folder: Path, task: str) -> dict[str, int]:
    """Every split list exists and names existing images with labels in range; returns split sizes."""
    sizes = {}
    classes = VTAB_TASKS[task][1]
    for split in VTAB_SPLITS:
        list_file = folder / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"{str(list_file)!r} is missing (a VTAB-1k task has {', '.join(VTAB_SPLITS)} lists)")
        lines = [l for l in list_file.read_text().splitlines() if l.strip()]
        for number, line in enumerate(lines, 1):
            path, _, label = line.rpartition(" ")
            if not label.isdigit() or not 0 <= int(label) < classes:
                raise ValueError(f"{list_file}:{number}: {line!r} is not '<relative path> <label in 0..{classes - 1}>'")
            if not (folder / path).is_file():
                raise FileNotFoundError(f"{list_file}:{number}: image {path!r} does not exist")
        sizes[split] = len(lines)
    return sizes


def prepare_vtab(archive: str | Path, out: str | Path) -> dict[str, dict[str, int]]:
    """Unpack a VTAB-1k archive (NOAH / SSF / SPT copies), rename task folders to the SPT/SNELL names
    (cifar100 → cifar, oxford_pet → oxford_iiit_pet), check every task and move it to ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".vtab-prepare-") as tmp:
        raw, staging = Path(tmp) / "raw", Path(tmp) / "staging"
        extract(archive, raw)
        staging.mkdir()
        found: dict[str, dict[str, int]] = {}
        for list_file in sorted(raw.rglob("train800val200.txt")):
            alias = list_file.parent.name
            task = _ALIAS_TO_TASK.get(alias)
            if task is None:
                continue
            if task in found:
                raise ValueError(f"task {task!r} appears twice in {str(archive)!r}")
            found[task] = check_vtab_task(list_file.parent, task)
            shutil.move(str(list_file.parent), staging / task)
        if not found:
            raise ValueError(f"{str(archive)!r} holds no VTAB-1k task folder (looked for <task>/train800val200.txt "
                             f"with task names {', '.join(_ALIAS_TO_TASK)})")
        _commit(staging, out)
    return found


def prepare_fgvc(dataset: str, images: str | Path, splits: str | Path, out: str | Path) -> dict[str, int]:
    """Unpack a dataset's image archive and its VPT split files (train/val/test.json) into
    ``out/<dataset>/``, checking that every listed image exists."""
    if dataset not in FGVC_DATASETS:
        raise ValueError(f"unknown FGVC dataset {dataset!r}; datasets: {', '.join(FGVC_DATASETS)}")
    _, image_dir, _ = FGVC_DATASETS[dataset]
    out = Path(out)
    destination = out / dataset
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{dataset}-prepare-") as tmp:
        raw_images, raw_splits, staging = Path(tmp) / "images", Path(tmp) / "splits", Path(tmp) / "staging"
        extract(images, raw_images)
        extract(splits, raw_splits)
        root = _image_root(raw_images, image_dir, dataset)
        staging.mkdir()
        sizes = {}
        for split in ("train", "val", "test"):
            source = next(iter(sorted(raw_splits.rglob(f"{split}.json"))), None)
            if source is None:
                raise FileNotFoundError(f"no {split}.json in {str(splits)!r} (VPT split files train.json, val.json, test.json)")
            mapping = json.loads(source.read_text())
            if not isinstance(mapping, dict):
                raise ValueError(f"{source.name} must map relative image path -> class id")
            missing = [p for p in mapping if not (root / image_dir / p).is_file()]
            if missing:
                raise FileNotFoundError(f"{split}.json lists {len(missing)} image(s) not in the archive, e.g. {missing[0]!r}")
            shutil.copy(source, staging / f"{split}.json")
            sizes[split] = len(mapping)
        if image_dir:
            shutil.move(str(root / image_dir), staging / image_dir)
        else:
            for child in root.iterdir():
                shutil.move(str(child), staging / child.name)
        _commit(staging, destination)
    return sizes


def _image_root(raw: Path, image_dir: str, dataset: str) -> Path:
    """The folder of the unpacked archive that holds ``image_dir`` (archives often add a top folder)."""
    if not image_dir:
        children = [c for c in raw.iterdir()]
        return children[0] if len(children) == 1 and children[0].is_dir() else raw
    for candidate in [raw, *sorted(p for p in raw.rglob("*") if p.is_dir())]:
        if (candidate / image_dir).is_dir():
            return candidate
    raise FileNotFoundError(f"the {dataset} archive has no {image_dir!r} folder")
