"""Adapters of a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): its parameters are DTensors,
each rank holding one shard.

``vp.save`` is then called on every rank: :func:`gathered` turns every sharded tensor into the full one (one
collective per tensor, in the state dict's order, which is the same on every rank), rank 0 writes, and
:func:`written_on_rank_zero` tells every rank how the write went, so all of them return (or raise) after it.
Buffers (SaRA's indices, SNELLA's budgets, NOLA's shape stamp) are not sharded: every rank holds the same copy.
Training hooks that read parameters outside the forward (SNELLA's importance, SaRA's re-selection and rank penalty)
read them through :func:`full_tensor`; inside the forward FSDP2 has gathered them already.

Nothing here imports torch.distributed's tensor or FSDP modules (seconds of import time): a tensor can only be a
DTensor once the program has imported them.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a shard of a parameter of an FSDP2 model)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor gathered from every rank (differentiable; a collective, so every rank must call
    it), any other tensor as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def any_sharded(state: dict[str, torch.Tensor]) -> bool:
    return any(is_sharded(value) for value in state.values())


def gathered(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every DTensor gathered into the full tensor, every tensor detached and copied to the CPU."""
    return {key: full_tensor(value.detach()).to("cpu", copy=True).contiguous() for key, value in state.items()}


def unsharded_class(model: nn.Module) -> type:
    """The model's own class, under FSDP2's ``FSDP<Class>`` and visionpeft's ``Adapted<Class>`` (a root adapted by
    ``targets="all"``)."""
    cls = type(model)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and issubclass(cls, fsdp.FSDPModule):
        cls = next(base for base in cls.__mro__[1:] if not issubclass(base, fsdp.FSDPModule))
    return getattr(cls, "_vp_base_class", cls)


def written_on_rank_zero(sharded: bool, write: Callable[[], None]) -> None:
    """Run ``write`` on rank 0 when the state is ``sharded`` (in this process otherwise); every rank returns after
    it, or raises if it failed on rank 0."""
    if not sharded:
        write()
        return
    failure = None
    if torch.distributed.get_rank() == 0:
        try:
            write()
        except Exception as error:  # noqa: BLE001 - reported to every rank below, then raised on rank 0
            failure = error
    outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    torch.distributed.broadcast_object_list(outcome, src=0)  # also the barrier: no rank returns before the write
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise RuntimeError(f"saving the adapter failed on rank 0 ({outcome[0]}); the previous files are unchanged")
