"""Datasets in the standard on-disk formats of the vision PEFT benchmarks."""
from visionpeft.data.formats import (
    VTAB_TASKS, ListDataset, build_dataset, fgvc_dataset, imagefolder_dataset, vtab_dataset,
)
from visionpeft.data.transforms import build_transform

__all__ = ["VTAB_TASKS", "ListDataset", "build_dataset", "fgvc_dataset", "imagefolder_dataset",
           "vtab_dataset", "build_transform"]
