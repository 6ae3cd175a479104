"""Hugging Face PEFT adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<layer>.<suffix>`` with the per-layer tensors of the adapter's method
(``interop/peft_variants.py``: LoRA's ``lora_A.weight`` / ``lora_B.weight``, DoRA's also
``lora_magnitude_vector``), and the tensors of ``modules_to_save`` under their own keys; ΔW = scale · B·A
with scale = lora_alpha / r (``use_rslora``: lora_alpha / √r). That is visionpeft's LoRA exactly, so the factors
are copied as they are. A layer whose rank or alpha differs from the adapter's is written to ``rank_pattern`` /
``alpha_pattern`` (an escaped full layer name) and read back as a per-layer option. ``modules_to_save`` is
visionpeft's ``unfreeze``.

A method maps onto the format through a :class:`~visionpeft.interop.peft_variants.PeftVariant` (``VARIANTS``, by
method name): the config fields it sets (``use_dora``) and the per-layer tensors it writes and reads. A directory
is read as the variant whose ``accepts`` takes its config. What the format cannot express is refused with a
ValueError naming the method or layer.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionpeft.interop.peft_variants import VARIANTS, PeftVariant, register_variant  # noqa: F401 (the seam)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
_ELSEWHERE = ("Save it in the native format (format='visionpeft'), or make a LoRA of it with "
              "vp.combine(model, {name: 1.0}, name=..., how='svd', rank=...) first")
#: config fields whose non-default values visionpeft has no equivalent for
_UNSUPPORTED_FIELDS = {"bias": "none", "lora_bias": False, "layer_replication": None, "target_parameters": None,
                       "trainable_token_indices": None, "use_qalora": False, "use_bdlora": None,
                       "alora_invocation_tokens": None}


def is_peft_directory(directory: str | os.PathLike) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


# --- export -------------------------------------------------------------------------------------------------------
def _layer_problem(slot_name: str, slot) -> str | None:
    """Why one adapted slot has no PEFT LoRA layer (None: it has one)."""
    if slot_name != "weight":
        return f"weight slot {slot_name!r} (PEFT has no matching layer)"
    if slot.op not in ("linear", "conv"):
        return f"op {slot.op!r} (only Linear, Conv1D and Conv layers)"
    if slot.op == "conv" and slot.groups != 1:
        return f"groups={slot.groups}"
    if slot.op == "conv" and any(d != 1 for d in slot.dilation):
        return f"dilation={tuple(slot.dilation)} (PEFT's down conv does not copy it)"
    if slot.op == "conv" and slot.padding_mode != "zeros":
        return f"padding_mode={slot.padding_mode!r} (PEFT's down conv does not copy it)"
    return None


def _pattern(layer: str) -> str:
    return re.escape(layer)


def peft_state(model: nn.Module, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The PEFT config and tensors of adapter ``name``; ValueError for what the format cannot express."""
    from visionpeft.core import adapted_layers, records

    record = records(model)[name]
    variant = VARIANTS.get(record.method)
    if variant is None:
        raise ValueError(f"adapter {name!r} is {record.method!r}, which PEFT's adapter format cannot express (it holds "
                         f"{', '.join(sorted(VARIANTS))}). {_ELSEWHERE}")
    if record.unfreeze_parameters:
        raise ValueError(f"adapter {name!r} trains single parameters {record.unfreeze_parameters[:3]}, which PEFT's "
                         f"format cannot express. {_ELSEWHERE}")
    tensors, ranks, alphas, problems = {}, {}, {}, []
    for layer_name, layer in adapted_layers(model):
        if name not in layer.vp_adapters:
            continue
        for slot_name, method in layer.vp_adapters[name].items():
            slot = layer._vp_slots[slot_name]
            problem = _layer_problem(slot_name, slot) if isinstance(method, nn.Module) and \
                not isinstance(method, nn.ModuleList) else "a fused projection adapted per block"
            if problem:
                problems.append(f"{layer_name} ({type(layer).__name__}: {problem})")
                continue
            for suffix, tensor in variant.tensors(method, slot).items():
                tensors[f"{PREFIX}{layer_name}.{suffix}"] = tensor.detach().float().contiguous()
            ranks[layer_name] = method.rank
            alphas[layer_name] = method.rank if method.config.get("alpha") is None else method.config["alpha"]
    if problems:
        raise ValueError(f"adapter {name!r} has layers that PEFT's format cannot express: {', '.join(problems[:5])}"
                         f"{f' and {len(problems) - 5} more' if len(problems) > 5 else ''}. {_ELSEWHERE}")
    state = model.state_dict()
    for module in record.unfreeze:
        for key, value in state.items():
            if key.startswith(module + ".") and ".vp_adapters." not in f".{key}":
                tensors[PREFIX + key] = value.detach().contiguous()
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(a for layer, a in alphas.items() if ranks[layer] == rank).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None,
        "inference_mode": True, "r": rank, "lora_alpha": _number(alpha), "lora_dropout": record.options.get("dropout", 0.0),
        "use_rslora": bool(record.options.get("rslora", False)), "target_modules": sorted(ranks),
        "rank_pattern": {_pattern(layer): r for layer, r in ranks.items() if r != rank},
        "alpha_pattern": {_pattern(layer): _number(a) for layer, a in alphas.items() if not math.isclose(a, alpha)},
        "modules_to_save": list(record.unfreeze) or None, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, **variant.config(record),
    }
    return config, tensors


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def save_peft(model: nn.Module, directory: Path, names: list[str]) -> None:
    from safetensors.torch import save_file

    from visionpeft.io import atomic_write

    if len(names) != 1:
        raise ValueError(f"format='peft' writes one adapter per directory; got {names}: pass names=[one of them]")
    config, tensors = peft_state(model, names[0])
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2)
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))


# --- import -------------------------------------------------------------------------------------------------------
def read_peft(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked config and the tensors (prefix stripped) of a PEFT adapter directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(directory / CONFIG_FILE)!r} is corrupt (not JSON: {err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(directory / CONFIG_FILE)!r} is not a PEFT adapter config")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"PEFT adapter in {str(directory)!r} has peft_type {config.get('peft_type')!r}; visionpeft "
                         f"reads peft_type 'LORA' (LoRA{', DoRA' if 'dora' in VARIANTS else ''})")
    for field, default in _UNSUPPORTED_FIELDS.items():
        if config.get(field, default) not in (default, None, False, [], {}):
            raise ValueError(f"PEFT adapter in {str(directory)!r} sets {field}={config[field]!r}, which visionpeft's "
                             f"LoRA has no equivalent for")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        found = " (only the pickled adapter_model.bin, which visionpeft never unpickles)" \
            if (directory / PICKLED_WEIGHTS_FILE).is_file() else ""
        raise FileNotFoundError(f"{str(weights)!r} is missing{found}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(weights)!r} is corrupt: {err}") from None
    return config, {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in tensors.items()}


def _pattern_value(patterns: dict[str, Any] | None, layer: str, default: Any) -> Any:
    """PEFT's rule: the first pattern that matches the end of the layer name at a dot boundary."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            return value
    return default


def _variant(config: dict[str, Any]) -> PeftVariant:
    for variant in VARIANTS.values():
        if variant.accepts(config):
            return variant
    flags = {k: v for k, v in config.items() if k.startswith("use_") and v}
    raise ValueError(f"PEFT LoRA config with {flags} has no visionpeft method; available: {', '.join(VARIANTS)}")


def _unfrozen(model: nn.Module, config: dict[str, Any], rest: dict[str, torch.Tensor]) -> list[str]:
    """The modules named by ``modules_to_save`` whose tensors the file holds (PEFT matches names by suffix)."""
    entries = config.get("modules_to_save") or []
    state = model.state_dict()
    chosen = []
    for module_name, _ in model.named_modules():
        if module_name and any(module_name == e or module_name.endswith("." + e) for e in entries):
            if any(k.startswith(module_name + ".") for k in rest):
                chosen.append(module_name)
    covered = {k for k in rest if any(k.startswith(m + ".") for m in chosen)}
    stray = sorted(set(rest) - covered)
    if stray:
        raise ValueError(f"PEFT adapter holds tensors visionpeft cannot place: {stray[:5]} (neither LoRA factors nor "
                         f"modules_to_save {entries})")
    wrong = [k for k in covered if k not in state or tuple(state[k].shape) != tuple(rest[k].shape)]
    if wrong:
        raise ValueError(f"PEFT adapter's modules_to_save tensors {wrong[:5]} do not fit this {type(model).__name__}")
    return chosen


def load_peft(model: nn.Module, directory: Path, name: str):
    """Plan a PEFT adapter directory as visionpeft adapter ``name`` (checked, built off-model); returns
    ``(plan, tensors of the unfrozen modules)`` for :func:`visionpeft.io.load` to install."""
    from visionpeft.core import plan
    from visionpeft.layers.adapted import layer_kind
    from visionpeft.targeting import Target

    config, tensors = read_peft(directory)
    variant = _variant(config)
    suffixes = variant.suffixes()
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in tensors.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None:
            rest[key] = value
        else:
            per_layer.setdefault(key[:-len(suffix) - 1], {})[suffix] = value
    if not per_layer:
        raise ValueError(f"PEFT adapter in {str(directory)!r} holds no LoRA factors")
    modules = dict(model.named_modules())
    targets = []
    for layer, parts in per_layer.items():
        module = modules.get(layer)
        kind = layer_kind(module) if module is not None else None
        if kind is None or "weight" not in kind.slot_names(module):
            found = "missing" if module is None else f"a {type(module).__name__} with no adaptable weight"
            raise ValueError(f"PEFT adapter in {str(directory)!r} was saved for another model: layer {layer!r} is "
                             f"{found} in this {type(model).__name__}")
        missing = sorted(set(suffixes) - set(parts))
        if missing:
            raise ValueError(f"PEFT adapter: layer {layer!r} lacks {missing}")
        problem = _layer_problem("weight", kind.slot(module, "weight", layer))
        if problem:
            raise ValueError(f"PEFT adapter: layer {layer!r} ({type(module).__name__}: {problem}) has no visionpeft LoRA "
                             f"with PEFT's output")
        targets.append(Target(layer, module, kind, ["weight"]))
    unfreeze = _unfrozen(model, config, rest)
    rslora = bool(config.get("use_rslora", False))
    options = {"rank": int(config.get("r", 8)), "alpha": config.get("lora_alpha", 8),
               "dropout": float(config.get("lora_dropout", 0.0) or 0.0), "rslora": rslora}
    layer_options = {}
    for layer, parts in per_layer.items():
        rank = variant.rank(parts)
        alpha = _pattern_value(config.get("alpha_pattern"), layer, options["alpha"])
        overrides = {k: v for k, v in (("rank", rank), ("alpha", alpha)) if v != options[k]}
        if overrides:
            layer_options[layer] = overrides
    try:
        result = plan(model, variant.method, targets, name, unfreeze, options, layer_options)
    except ValueError as err:
        raise ValueError(f"PEFT adapter in {str(directory)!r}: {err}") from None
    for layer, parts in per_layer.items():
        method = result.instances[layer]["weight"]
        try:
            variant.load(method, parts)
        except ValueError as err:
            raise ValueError(f"PEFT adapter: layer {layer!r}: {err}") from None
    return result, {k: v for k, v in rest.items() if any(k.startswith(m + ".") for m in unfreeze)}
