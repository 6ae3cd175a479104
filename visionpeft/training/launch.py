"""Where a run executes: the accelerator of a recipe's ``train.device`` and ``train.precision``, the launch
environment (``torchrun`` / ``accelerate launch``), progress bars, and peak memory.

A launcher starts N processes and sets ``WORLD_SIZE``; they must form one data-parallel job, also on a
machine without a GPU (there accelerate would otherwise start N independent CPU trainings into one folder).
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch

#: the environment variables a launcher sets to the number of processes (torchrun, accelerate, MPI)
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_warned: set[str] = set()


def launched_processes() -> int:
    """The number of processes the launcher started (1 without a launcher)."""
    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def has_gpu() -> bool:
    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    """The recipe's ``train.device`` made definite where it matters: ``cuda`` must exist, and ``auto`` without a GPU
    is ``cpu`` (except on Apple silicon run as one process, where accelerate picks MPS)."""
    if device == "cuda" and not has_gpu():
        raise ValueError("train.device='cuda' but no CUDA GPU is available (torch.cuda.is_available() is False); "
                         "use train.device=auto or train.device=cpu")
    mps = getattr(torch.backends, "mps", None)
    if device == "auto" and not has_gpu() and not (launched_processes() == 1 and mps and mps.is_available()):
        return "cpu"
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``no``, ``bf16`` or ``fp16`` from ``train.precision`` on ``device`` (auto: bf16 on a GPU that has it,
    else fp16 on a GPU, full precision on the CPU). fp16 on the CPU is slower than fp32 and is warned about once."""
    if precision == "auto":
        if device == "cpu" or not has_gpu():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device == "cpu" and "fp16-cpu" not in _warned:
        _warned.add("fp16-cpu")
        warnings.warn("train.precision='fp16' on the CPU is several times slower than full precision; "
                      "train.precision=auto picks the best for the device", stacklevel=2)
    return precision


def make_accelerator(recipe: dict[str, Any], split_batches: bool = True):
    """The accelerator of a recipe: its device, precision and gradient accumulation, and one data-parallel
    job over every process a launcher started."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    train = recipe["train"]
    device = resolve_device(train["device"])
    precision = resolve_precision(train["precision"], device)
    # accelerate keeps one global state per process; a sweep or a notebook runs several recipes (with other
    # precisions) in one process, so start each from a clean state (the process group itself is kept)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # cpu=True is also what makes accelerate join the launched processes into one job on a machine without a GPU
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=train["grad_accum"],
                              cpu=device == "cpu",
                              dataloader_config=DataLoaderConfiguration(split_batches=split_batches))
    launched = launched_processes()
    if accelerator.num_processes != launched:
        raise RuntimeError(f"the launcher started {launched} processes but accelerate joined "
                           f"{accelerator.num_processes}: they would train independently into one output folder")
    return accelerator


def progress_enabled(progress: bool, accelerator) -> bool:
    """Bars on the local main process only, and never when ``TQDM_DISABLE`` is set (tqdm's own switch, which
    an explicit ``disable=`` would otherwise override)."""
    silenced = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")
    return progress and accelerator.is_local_main_process and not silenced


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
