"""``train.fsdp: true``: the recipe runner shards the adapted model with FSDP2 itself, on GPUs and on the CPU (gloo).

After ``vp.attach``, :func:`shard` applies ``torch.distributed.fsdp.fully_shard`` to each repeated block the family
preset knows (a ViT's ``blocks``, a ConvNeXt's ``stages``; none for a model no rule covers) and then to the root, over
one mesh of every process. accelerate never wraps this model: it prepares the data loaders and the scheduler, and the
runner steps the optimizer itself (accelerate's DDP wrapping would all-reduce what FSDP2 already reduce-scatters, and
its own FSDP plugin runs only on GPUs and checkpoints the whole sharded state dict). Mixed precision is autocast
around the root's forward, as accelerate does for a model it prepares.

A checkpoint holds, beside accelerate's scheduler and RNG state, the trained state gathered whole
(:data:`MODEL_FILE`: the tensors a non-sharded checkpoint keeps, see ``checkpoints.trained_state_keys``) and the
optimizer's state keyed by parameter name (:data:`OPTIMIZER_FILE`), both written by rank 0: whole tensors, whatever
the number of processes that wrote them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from visionpeft.distributed import gathered, written_on_rank_zero

MODEL_FILE = "fsdp_model.safetensors"
OPTIMIZER_FILE = "fsdp_optimizer.pt"


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the model's family preset (each child of a block list), in order; empty where no family
    rule covers the model (the root alone is sharded then). Taken before ``vp.attach``, which can change the root's
    class (``targets="all"``) but keeps every module object."""
    from visionpeft.families import find_rule

    rule = find_rule(model)
    if rule is None:
        return []
    modules = dict(model.named_modules())
    units: list[nn.Module] = []
    for name in rule.trunk(model)[0]:
        container = modules[name]
        blocks = list(container.children()) if isinstance(container, (nn.ModuleList, nn.Sequential)) else [container]
        units += [block for block in blocks if any(True for _ in block.parameters())]
    return units


def shard(model: nn.Module, units: list[nn.Module], device: torch.device, mixed_precision: str) -> nn.Module:
    """``fully_shard`` on each unit, then on the root, over one mesh of every process (in place; the model's
    parameters become DTensors, so the optimizer is built afterwards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if mixed_precision == "bf16":
        from accelerate.utils import convert_outputs_to_fp32

        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        model.forward = convert_outputs_to_fp32(autocast(model.forward))
    return model


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def save_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, keys: set[str]) -> None:
    """The trained tensors named in ``keys`` and the optimizer's state, gathered whole and written into ``folder``
    by rank 0. Every rank calls it (collectives); every rank returns after the write, or raises if it failed."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tensors = gathered({key: value for key, value in model.state_dict().items() if key in keys})
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))

    def write() -> None:
        save_file(tensors, str(folder / MODEL_FILE))
        torch.save(optimizer_state, folder / OPTIMIZER_FILE)

    written_on_rank_zero(True, write)


def load_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """What :func:`save_state` wrote, sharded back into ``model`` and ``optimizer`` (every rank reads the files)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    for name in (MODEL_FILE, OPTIMIZER_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{str(folder)!r} has no {name}: it is not a checkpoint of a train.fsdp=true run")
    set_model_state_dict(model, load_file(str(folder / MODEL_FILE)), options=_options(strict=False))
    optimizer_state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_options())
