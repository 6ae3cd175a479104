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


#: the environment variables ``accelerate launch`` sets from its FSDP options (``--use_fsdp``, ``--fsdp_version``)
FSDP_VARIABLES = ("ACCELERATE_USE_FSDP", "FSDP_VERSION")


def accelerate_fsdp() -> str | None:
    """The FSDP version ``accelerate launch --use_fsdp`` asked for (``"1"`` or ``"2"``), None without ``--use_fsdp``."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() not in ("1", "true", "yes"):
        return None
    return os.environ.get("FSDP_VERSION", "1").strip() or "1"


def check_fsdp_launch(device: str) -> None:
    """For a run that does not shard itself (DreamBooth, evaluation): accelerate's FSDP options with one process are
    refused (a ValueError naming the option and what is allowed), before the accelerator is built or anything is
    written. On the CPU accelerate ignores them (it builds a plain data-parallel MULTI_CPU job without its FSDP
    plugin), so they are refused there too rather than silently training unsharded."""
    version = accelerate_fsdp()
    if version and device == "cpu" and launched_processes() > 1:
        raise ValueError("--use_fsdp (ACCELERATE_USE_FSDP) was given with train.device resolving to 'cpu'; "
                         "accelerate runs FSDP only on GPUs and would train plain data-parallel here: use a GPU "
                         "(train.device=cuda or auto), or drop --use_fsdp for a data-parallel CPU run")
    if version and launched_processes() == 1:
        raise ValueError(f"--use_fsdp (ACCELERATE_USE_FSDP, FSDP_VERSION={version}) was given but the launcher "
                         f"started 1 process; FSDP needs a distributed launch of 2 or more processes "
                         f"(accelerate launch --num_processes N with N >= 2), or drop --use_fsdp for a "
                         f"one-process run")


def runner_shards(recipe: dict[str, Any]) -> bool:
    """Whether the classification runner shards its model with FSDP2 itself (:mod:`~visionpeft.training.fsdp`):
    ``train.fsdp: true``, or accelerate's ``--use_fsdp --fsdp_version 2`` on GPUs, which takes the same path. What
    cannot run is a ValueError naming the option and what is allowed, before anything is built or written: either
    with one process; accelerate's ``--use_fsdp`` on the CPU (where accelerate would train plain data-parallel: the
    message points to ``train.fsdp=true``); FSDP version 1 (flat parameters, which ``vp.save`` cannot read);
    ``train.precision=fp16`` (no sharded gradient scaler); and α-LoRA's held-out step (``data.alpha_holdout``)."""
    train = recipe["train"]
    device = resolve_device(train["device"])
    version = accelerate_fsdp()
    processes = launched_processes()
    if train["fsdp"] and processes == 1:
        raise ValueError("train.fsdp=true needs a distributed launch of 2 or more processes, but the launcher started "
                         "1 process: use torchrun --nproc_per_node N (or accelerate launch --num_processes N) with "
                         "N >= 2, or train.fsdp=false for a one-process run")
    if version is None and not train["fsdp"]:
        return False
    if version is not None:
        if processes == 1:
            check_fsdp_launch(device)  # the one-process refusal
        if device == "cpu":
            raise ValueError("--use_fsdp (ACCELERATE_USE_FSDP) was given with train.device resolving to 'cpu'; "
                             "accelerate runs FSDP only on GPUs and would train plain data-parallel here: drop "
                             "--use_fsdp and give train.fsdp=true, which shards with FSDP2 on the CPU too")
        if version != "2":
            raise ValueError(f"--use_fsdp with FSDP_VERSION={version}: visionpeft trains sharded with FSDP2 only "
                             f"(FSDP1's flat parameters hide the adapter's tensors); give --fsdp_version 2, or "
                             f"drop --use_fsdp and give train.fsdp=true")
    what = "train.fsdp=true" if train["fsdp"] else "--use_fsdp --fsdp_version 2"
    if resolve_precision(train["precision"], device) == "fp16":
        raise ValueError(f"{what} with train.precision resolving to 'fp16': the sharded run has no fp16 gradient "
                         f"scaler; use train.precision=bf16 or train.precision=no")
    if recipe["data"].get("alpha_holdout") is not None:
        raise ValueError(f"{what} with data.alpha_holdout={recipe['data']['alpha_holdout']!r}: alpha-lora's held-out "
                         f"step is not sharded; give data.alpha_holdout=null (alpha trains with the adapter) or run "
                         f"without FSDP")
    return True


def make_accelerator(recipe: dict[str, Any], split_batches: bool = True, shards: bool = False):
    """The accelerator of a recipe: its device, precision and gradient accumulation, and one data-parallel
    job over every process a launcher started. ``shards``: the caller shards the model itself
    (:func:`runner_shards`), so accelerate is built without its FSDP plugin even under ``--use_fsdp``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    train = recipe["train"]
    device = resolve_device(train["device"])
    if not shards:
        check_fsdp_launch(device)
    precision = resolve_precision(train["precision"], device)
    # accelerate keeps one global state per process; a sweep or a notebook runs several recipes (with other
    # precisions) in one process, so start each from a clean state (the process group itself is kept)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    hidden = {name: os.environ.pop(name) for name in FSDP_VARIABLES if shards and name in os.environ}
    try:
        # cpu=True is also what makes accelerate join the launched processes into one job on a machine without a GPU
        accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=train["grad_accum"],
                                  cpu=device == "cpu",
                                  dataloader_config=DataLoaderConfiguration(split_batches=split_batches))
    finally:
        os.environ.update(hidden)
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
