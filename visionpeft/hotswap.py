"""Hot-swap: copy a saved adapter's tensors into an attached adapter of the same method and layers, in place.

No module, attribute or tensor shape changes, so a ``torch.compile``'d model keeps its compiled graphs. A LoRA of a
smaller rank is zero-padded to the attached rank, its scale folded into B (the attached scale stays as compiled).
Every check runs, and the new tensors are built off-model, before the first copy.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

_STAGING = "_vp_hotswap"


def _source(model: nn.Module, directory: Path):
    """The saved adapter as an off-model plan (its instances loaded) and its unfrozen modules' tensors."""
    from visionpeft import io
    from visionpeft.interop.peft_format import is_peft_directory, load_peft

    if is_peft_directory(directory) and not (directory / io.CONFIG_FILE).is_file():
        return load_peft(model, directory, _STAGING)
    config, tensors = io._read_native(directory, _STAGING)
    source = io._plan_from_record(model, config["adapters"][0], _STAGING)
    expected = io._expected_state(model, [source])
    io._check_fits(directory, model, expected, tensors)
    io._load_instances([source], tensors)
    return source, {k: tensors[k] for k in expected if io.ADAPTERS_ATTR not in k.split(".")}


def _padded_lora(source: nn.Module, target: nn.Module, where: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    down, up, scale = source.factors()
    if source.rank > target.rank:
        raise ValueError(f"hotswap: {where} has rank {source.rank} in the file, larger than the attached rank "
                         f"{target.rank}")
    padded_down = torch.zeros_like(target.lora_A)
    padded_up = torch.zeros_like(target.lora_B)
    padded_down[:source.rank] = down
    padded_up[:, :source.rank] = up
    return padded_down, padded_up, scale


def hotswap(model: nn.Module, directory: Path, name: str | None) -> nn.Module:
    from visionpeft.core import records

    attached = records(model)
    if name not in attached:
        raise ValueError(f"hotswap: no attached adapter named {name!r} to copy into; attached: "
                         f"{', '.join(attached) or '(none)'}")
    record = attached[name]
    source, base_tensors = _source(model, directory)
    if source.record.method != record.method:
        raise ValueError(f"hotswap: the file holds a {source.record.method!r} adapter, {name!r} is {record.method!r}")
    if source.record.layers != record.layers:
        differ = sorted(set(source.record.layers) ^ set(record.layers))[:5] or "slots"
        raise ValueError(f"hotswap: the file's adapter covers other layers than {name!r} (differing: {differ})")
    if set(source.record.unfreeze) != set(record.unfreeze):
        raise ValueError(f"hotswap: the file unfreezes {source.record.unfreeze}, {name!r} unfreezes {record.unfreeze}")
    modules = dict(model.named_modules())
    copies = []  # (target tensor, new value)
    for layer_name, slots in source.instances.items():
        for slot_name, new in slots.items():
            old = modules[layer_name].vp_adapters[name][slot_name]
            where = f"layer {layer_name!r}:{slot_name}"
            if record.method == "lora":
                down, up, scale = _padded_lora(new, old, where)
                ratio = scale / float(old.scale)
                copies += [(old.lora_A, down), (old.lora_B, (up.double() * ratio).to(old.lora_B.dtype))]
                continue
            new_state, old_state = new.state_dict(), old.state_dict(keep_vars=True)
            wrong = [k for k in old_state if k not in new_state or new_state[k].shape != old_state[k].shape]
            if wrong:
                raise ValueError(f"hotswap: {where}: tensors {wrong[:3]} differ in shape from the attached adapter's")
            copies += [(old_state[k], new_state[k]) for k in old_state]
    state = model.state_dict(keep_vars=True)
    copies += [(state[k], v) for k, v in base_tensors.items()]
    with torch.no_grad():
        for target, value in copies:
            target.copy_(value)
    return model
