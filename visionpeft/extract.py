"""Compress a fully fine-tuned model into an adapter: each targeted weight difference is fitted by the
method's own low-rank form (LoRA: truncated SVD; FLoRA: truncated Tucker), on the base model."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from visionpeft.core import adapted_layers, attach, records
from visionpeft.methods.base import Method, get_method


def extract(base_model: nn.Module, tuned_model: nn.Module, method: str, *, targets: Any = None,
            unfreeze: Any = (), name: str = "default", **options: Any) -> nn.Module:
    """Attach ``method`` to ``base_model`` with parameters fitted to ``tuned_model - base_model``.

    Modules in ``unfreeze`` (e.g. a new head) take the tuned model's tensors and stay trainable.
    The relative reconstruction error ‖ΔW − ΔŴ‖/‖ΔW‖ of every layer is recorded and shown by
    :func:`visionpeft.summary`. Returns ``base_model``.
    """
    cls = get_method(method)
    if cls.fit_delta is Method.fit_delta:
        raise ValueError(f"extract supports methods that can be fitted to a weight difference "
                         f"(lora, flora); {method!r} cannot")
    base_state, tuned_state = base_model.state_dict(), tuned_model.state_dict()
    mismatched = [k for k in base_state if k not in tuned_state or tuned_state[k].shape != base_state[k].shape]
    extra = [k for k in tuned_state if k not in base_state]
    if mismatched or extra:
        raise ValueError(f"tuned_model does not have base_model's architecture: differing keys "
                         f"{(mismatched + extra)[:5]}")
    tuned_modules = dict(tuned_model.named_modules())
    attach(base_model, method, targets=targets, unfreeze=unfreeze, name=name, **options)
    errors: dict[str, float] = {}
    with torch.no_grad():
        for layer_name, layer in adapted_layers(base_model):
            if name not in layer.vp_adapters:
                continue
            tuned = tuned_modules[layer_name]
            for slot_name, methods in layer.vp_adapters[name].items():
                target = (layer._vp_kind.read(tuned, slot_name).float() - layer._vp_kind.read(layer, slot_name).float())
                parts = target.split(layer._vp_slots[slot_name].block_split(), 0) if isinstance(methods, nn.ModuleList) \
                    else [target]
                for instance, part in zip(methods if isinstance(methods, nn.ModuleList) else [methods], parts):
                    instance.fit_delta(part)
                fitted = layer.vp_delta(name, slot_name)
                norm = target.norm().item()
                errors[f"{layer_name}:{slot_name}"] = (fitted - target).norm().item() / norm if norm > 0 else 0.0
        modules = dict(base_model.named_modules())
        for module_name in records(base_model)[name].unfreeze:
            modules[module_name].load_state_dict(tuned_modules[module_name].state_dict())
    records(base_model)[name].reconstruction_error = errors
    return base_model
