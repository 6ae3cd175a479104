"""Weights read by another module's forward: the adapted layer's weight attribute carries W + ΔW there.

Some modules never call a child layer; they read its weight and run the op themselves: timm's EVA, BEiT and
Swin-V2 attention compute ``F.linear(x, self.qkv.weight, qkv_bias)`` when their q/v biases are separate, and any
user module may do the same. The adapted layer's own forward then never runs, so an adapter that lives in that
forward would get no gradient and change nothing, while ``merge`` would fold in an update training never saw.

Instead, while any forward of a module that contains an adapted layer is running, reading that layer's slot
weight from outside the layer's own forward (``module.qkv.weight``) returns the weight with the active, unmerged
adapters applied, exactly as the layer's weight path computes it. Outside forwards the attribute is the plain
parameter (inspection, initialisation and in-place edits are unaffected), and inside the layer's own forward it
is whatever the layer runs with. Nothing is listed per model: the reader is found by the read itself.

The running forwards are counted by a pre-hook and an always-called post-hook on every ancestor of an adapted
layer (:func:`track`, re-run whenever layers are adapted or restored); the hooks are module-level functions,
so adapted models still deep-copy and pickle.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _Depth:
    """How many tracked forwards are running (nested calls count once each)."""

    value = 0


DEPTH = _Depth()
#: instance attribute of an adapted layer: how many of its own forwards are running
OWN_ATTR = "_vp_own_forwards"
#: instance attribute of an adapted layer: parameter attribute name -> slot, for slots the layer itself holds
DIRECT_ATTR = "_vp_direct_slots"


def _enter(module: nn.Module, args: Any) -> None:
    DEPTH.value += 1


def _leave(module: nn.Module, args: Any, output: Any) -> None:
    DEPTH.value -= 1


def _is_adapted(module: nn.Module) -> bool:
    return DIRECT_ATTR in module.__dict__


def _remove_hooks(module: nn.Module) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _enter:
            del module._forward_pre_hooks[key]
    for key, hook in list(module._forward_hooks.items()):
        if hook is _leave:
            del module._forward_hooks[key]
            module._forward_hooks_always_called.pop(key, None)


def track(model: nn.Module) -> None:
    """Hook exactly the ancestors (``model`` included) of the adapted layers of ``model``."""
    modules = dict(model.named_modules(remove_duplicate=False))
    ancestors: set[str] = set()
    for name, module in modules.items():
        if _is_adapted(module):
            parts = name.split(".") if name else []
            ancestors.update(".".join(parts[:i]) for i in range(len(parts)))
    for name, module in modules.items():
        _remove_hooks(module)
    for name in ancestors:
        module = modules[name]
        if _enter not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_enter)
            module.register_forward_hook(_leave, always_call=True)


def direct_slots(module: nn.Module, kind, slots) -> dict[str, tuple[str, bool]]:
    """Parameter attribute names of ``module`` that hold one of its slots' weights (or a single-input slot's bias,
    which a method may scale) -> (slot name, whether it is the bias)."""
    found = {}
    for slot in slots:
        owner, attr = kind.parameter(module, slot)
        if owner is module:
            found[attr] = (slot, False)
        bias = kind.bias(module, slot) if kind.single_input else None
        if bias is not None and bias[0] is module and bias[1] not in found:
            found[bias[1]] = (slot, True)
    return found


def read_from_outside(layer: nn.Module, attr: str) -> bool:
    """Whether a read of ``layer.<attr>`` right now is a direct read of an adapted slot by another forward."""
    state = layer.__dict__
    return DEPTH.value > 0 and not state.get(OWN_ATTR) and attr in state.get(DIRECT_ATTR, ())


def carried_weight(layer: nn.Module, attr: str, raw: torch.Tensor) -> torch.Tensor:
    """``raw`` (stored orientation) with the layer's active, unmerged adapters of that slot applied; for the bias,
    as the methods that scale it apply it (``effective_bias``)."""
    if layer._vp_disabled:
        return raw
    slot_name, is_bias = layer.__dict__[DIRECT_ATTR][attr]
    names = [n for n in layer.vp_adapters if n not in layer._vp_merged and n not in layer._vp_inactive
             and slot_name in layer.vp_adapters[n]]
    if is_bias:
        methods = [layer.vp_adapters[n][slot_name] for n in names]
        names = [n for n, m in zip(names, methods) if hasattr(m, "effective_bias")]
    if not names:
        return raw
    if layer._vp_route is not None:
        raise ValueError(f"vp.routing cannot route the samples through {layer.__class__.__name__}'s {attr!r}: an "
                         f"enclosing module reads that weight directly instead of calling the layer, so every "
                         f"sample sees one weight. Route a model whose adapted layers are called, or merge")
    kind = layer._vp_kind
    slot = layer._vp_slots[slot_name]
    state = layer.__dict__
    state[OWN_ATTR] = state.get(OWN_ATTR, 0) + 1  # the reads below are the layer's own
    try:
        if is_bias:
            for name in names:
                raw = layer.vp_adapters[name][slot_name].effective_bias(raw, slot)
            return raw
        weight = kind.read(layer, slot_name)
        for name in names:
            methods = layer.vp_adapters[name][slot_name]
            if isinstance(methods, nn.ModuleList):  # a fused projection adapted per block
                parts = weight.split(slot.block_split(), dim=0)
                weight = torch.cat([m.effective_weight(p) for m, p in zip(methods, parts)], dim=0)
            else:
                weight = methods.effective_weight(weight)
        return kind.to_storage(weight)
    finally:
        state[OWN_ATTR] -= 1


__all__ = ["DEPTH", "track", "direct_slots", "read_from_outside", "carried_weight", "OWN_ATTR", "DIRECT_ATTR"]
