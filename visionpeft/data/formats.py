"""VTAB-1k (list files), FGVC (VPT json maps) and generic image folders.

VTAB-1k: ``<root>/<task>/{train800,val200,train800val200,test}.txt`` with lines ``<relative path> <label>``
(paths relative to the task folder). Folder names differ between the NOAH and the SPT/SNELL copies, so
a task is looked up under each of its aliases. FGVC: ``<root>/<dataset>/{train,val,test}.json``, each one
flat mapping ``relative image path → class id`` (ids re-indexed contiguously after sorting), with the
images under a per-dataset image folder. Every missing or malformed file is an error naming the file and
what was expected.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

#: task -> (group, number of classes, folder aliases: SPT/SNELL name first, then NOAH's)
VTAB_TASKS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "cifar": ("natural", 100, ("cifar", "cifar100")),
    "caltech101": ("natural", 102, ("caltech101",)),
    "dtd": ("natural", 47, ("dtd",)),
    "oxford_flowers102": ("natural", 102, ("oxford_flowers102",)),
    "oxford_iiit_pet": ("natural", 37, ("oxford_iiit_pet", "oxford_pet")),
    "svhn": ("natural", 10, ("svhn",)),
    "sun397": ("natural", 397, ("sun397",)),
    "patch_camelyon": ("specialized", 2, ("patch_camelyon",)),
    "eurosat": ("specialized", 10, ("eurosat",)),
    "resisc45": ("specialized", 45, ("resisc45",)),
    "diabetic_retinopathy": ("specialized", 5, ("diabetic_retinopathy",)),
    "clevr_count": ("structured", 8, ("clevr_count",)),
    "clevr_dist": ("structured", 6, ("clevr_dist",)),
    "dmlab": ("structured", 6, ("dmlab",)),
    "kitti": ("structured", 4, ("kitti",)),
    "dsprites_loc": ("structured", 16, ("dsprites_loc",)),
    "dsprites_ori": ("structured", 16, ("dsprites_ori",)),
    "smallnorb_azi": ("structured", 18, ("smallnorb_azi",)),
    "smallnorb_ele": ("structured", 9, ("smallnorb_ele",)),
}
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
_ALIASES = {alias: task for task, (_, _, aliases) in VTAB_TASKS.items() for alias in aliases}

#: FGVC dataset -> (number of classes, image folder inside the dataset folder, folder aliases)
FGVC_DATASETS: dict[str, tuple[int, str, tuple[str, ...]]] = {
    "cub": (200, "images", ("cub", "CUB_200_2011")),
    "nabirds": (555, "images", ("nabirds",)),
    "oxfordflower": (102, "", ("oxfordflower", "OxfordFlower")),
    "stanforddog": (120, "Images", ("stanforddog", "Stanford-dogs")),
    "stanfordcar": (196, "", ("stanfordcar", "Stanford-cars")),
}


class ListDataset(Dataset):
    """(image path, label) pairs read with PIL and transformed."""

    def __init__(self, samples: list[tuple[Path, int]], num_classes: int, transform: Callable | None = None) -> None:
        self.samples = samples
        self.labels = [label for _, label in samples]
        self.num_classes = num_classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        try:
            image = Image.open(path).convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image {str(path)!r} is listed but does not exist") from None
        return (self.transform(image) if self.transform else image), label


def _task_folder(root: Path, task: str) -> tuple[str, Path, int]:
    """(canonical name, folder, number of classes) of a VTAB-1k task, or of a generated task in the same
    format whose folder carries a ``task.json`` with ``num_classes`` (visionpeft.data.mini_vtab)."""
    canonical = _ALIASES.get(task)
    if canonical is None:
        described = root / task / "task.json"
        if described.is_file():
            return task, root / task, _declared_classes(described)
        raise ValueError(f"unknown VTAB-1k task {task!r} under {str(root)!r}; tasks: {', '.join(VTAB_TASKS)} "
                         f"(aliases: {', '.join(a for a in _ALIASES if a not in VTAB_TASKS)}), or a folder "
                         f"<root>/<task> with a task.json giving num_classes")
    for alias in VTAB_TASKS[canonical][2]:
        if (root / alias).is_dir():
            return canonical, root / alias, VTAB_TASKS[canonical][1]
    raise FileNotFoundError(f"VTAB-1k task {canonical!r} not found under {str(root)!r}: looked for folder(s) "
                            f"{', '.join(VTAB_TASKS[canonical][2])}")


def _declared_classes(path: Path) -> int:
    try:
        classes = json.loads(path.read_text()).get("num_classes")
    except (json.JSONDecodeError, AttributeError):
        classes = None
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        raise ValueError(f"{str(path)!r} must be a JSON object with an int num_classes >= 1")
    return classes


def vtab_dataset(root: str | Path, task: str, split: str, transform: Callable | None = None) -> ListDataset:
    if split not in VTAB_SPLITS:
        raise ValueError(f"VTAB-1k split {split!r} is not one of {', '.join(VTAB_SPLITS)}")
    canonical, folder, num_classes = _task_folder(Path(root), task)
    list_file = folder / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"{str(list_file)!r} is missing; a VTAB-1k task folder has "
                                f"{', '.join(s + '.txt' for s in VTAB_SPLITS)}")
    samples = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(" ", 1)
        if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
            raise ValueError(f"{str(list_file)}:{number}: {line!r} is not '<relative path> <int label>'")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise ValueError(f"{str(list_file)}:{number}: label {label} outside 0..{num_classes - 1} for task {canonical!r}")
        samples.append((folder / parts[0].strip(), label))
    if not samples:
        raise ValueError(f"{str(list_file)!r} lists no images")
    return ListDataset(samples, num_classes, transform)


def fgvc_dataset(root: str | Path, dataset: str, split: str, transform: Callable | None = None) -> ListDataset:
    """One split of a VPT-style FGVC dataset; ``dataset`` is a name of FGVC_DATASETS (or a folder under root)."""
    root = Path(root)
    image_dir = ""
    folder = root / dataset
    if dataset in FGVC_DATASETS:
        _, image_dir, aliases = FGVC_DATASETS[dataset]
        folder = next((root / a for a in aliases if (root / a).is_dir()), root / dataset)
    if not folder.is_dir():
        raise FileNotFoundError(f"FGVC dataset folder {str(folder)!r} does not exist (datasets: {', '.join(FGVC_DATASETS)})")
    split_file = folder / f"{split}.json"
    if not split_file.is_file():
        raise FileNotFoundError(f"{str(split_file)!r} is missing; an FGVC dataset folder has train.json, val.json and test.json")
    try:
        mapping = json.loads(split_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(split_file)!r} is not JSON: {err}") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in mapping.items()):
        raise ValueError(f"{str(split_file)!r} must be one JSON object mapping relative image path -> int class id")
    ids = _class_ids(folder)
    samples = [(folder / image_dir / path, ids[label]) for path, label in mapping.items()]
    unknown = sorted({label for label in mapping.values() if label not in ids})
    if unknown:
        raise ValueError(f"{str(split_file)!r} has class ids {unknown[:5]} that train.json does not have")
    return ListDataset(samples, len(ids), transform)


def _class_ids(folder: Path) -> dict[int, int]:
    """Sorted unique class ids of the train split (falling back to all splits) → contiguous 0..C-1."""
    ids: set[int] = set()
    for name in ("train.json", "val.json", "test.json"):
        path = folder / name
        if path.is_file():
            ids |= set(json.loads(path.read_text()).values())
    return {label: i for i, label in enumerate(sorted(ids))}


def imagefolder_dataset(root: str | Path, split: str, transform: Callable | None = None) -> ListDataset:
    """``<root>/<split>/<class name>/<image>``: classes are the sorted folder names of the train split."""
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder split {str(folder)!r} does not exist (layout: <root>/<split>/<class>/<image>)")
    reference = root / "train" if (root / "train").is_dir() else folder
    classes = sorted(p.name for p in reference.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{str(reference)!r} has no class folders")
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if class_dir.name not in index:
            raise ValueError(f"class folder {str(class_dir)!r} is not a class of the train split ({', '.join(classes)})")
        samples += [(p, index[class_dir.name]) for p in sorted(class_dir.iterdir())
                    if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp")]
    if not samples:
        raise ValueError(f"{str(folder)!r} holds no images")
    return ListDataset(samples, len(classes), transform)


def build_dataset(data: dict, split: str, transform: Callable | None) -> ListDataset:
    """The dataset of a recipe's ``data`` section for one split."""
    if data["format"] == "vtab1k":
        return vtab_dataset(data["root"], data["task"], split, transform)
    if data["format"] == "fgvc":
        if not data["task"]:
            raise ValueError("data.task names the FGVC dataset (cub, nabirds, oxfordflower, stanforddog, stanfordcar)")
        return fgvc_dataset(data["root"], data["task"], split, transform)
    return imagefolder_dataset(data["root"], split, transform)
