"""Adapters by name: list, switch, disable, delete, merge and unmerge the adapters attached to a model.

Every operation checks the names it is given against the attached adapters before anything changes.
"""
from __future__ import annotations

import contextlib
from numbers import Real
from typing import Any, Iterator

import torch
from torch import nn

from visionpeft.core import adapted_layers, apply_trainability, discard_adapters, records
from visionpeft.layers.quantized import requantization_summary


def check_names(model: nn.Module, names: Any, what: str) -> list[str]:
    """``names`` (one name or a list of names) as a list of attached adapter names; a ValueError that names
    the bad entry and lists the attached adapters otherwise."""
    attached = list(records(model))
    given = [names] if isinstance(names, str) else names
    if not isinstance(given, (list, tuple)) or not all(isinstance(n, str) for n in given):
        raise ValueError(f"{what}: names={names!r} must be an adapter name or a list of names; "
                         f"attached: {', '.join(attached) or '(none)'}")
    for name in given:
        if name not in attached:
            raise ValueError(f"{what}: adapter {name!r} is not attached; attached: {', '.join(attached) or '(none)'}")
    return list(dict.fromkeys(given))


def merged_adapters(model: nn.Module) -> set[str]:
    return {name for _, layer in adapted_layers(model) for name in layer._vp_merged}


def adapters(model: nn.Module) -> dict[str, dict[str, Any]]:
    """name -> {"method", "active", "merged", "layers", "parameters", "options"}, in attach order."""
    merged = merged_adapters(model)
    counts = dict.fromkeys(records(model), 0)
    for _, layer in adapted_layers(model):
        for name, slots in layer.vp_adapters.items():
            counts[name] = counts.get(name, 0) + sum(p.numel() for p in slots.parameters())
    return {name: {"method": r.method, "active": r.active, "merged": name in merged, "layers": list(r.layers),
                   "parameters": counts[name], "options": dict(r.options)}
            for name, r in records(model).items()}


def set_active(model: nn.Module, names: Any) -> nn.Module:
    """Only the adapters ``names`` contribute to the output and train; the others stay attached, frozen and
    saved. A merged adapter that becomes inactive is unmerged first."""
    chosen = set(check_names(model, names, "set_active"))
    for name, record in records(model).items():
        record.active = name in chosen
    for _, layer in adapted_layers(model):
        inactive = set(layer.vp_adapters) - chosen
        for name in inactive & set(layer._vp_merged):
            layer.vp_unmerge(name)
        layer.vp_set_inactive(inactive)
    apply_trainability(model)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the model gives the base model's output (merged adapters taken out); on exit everything is as
    before, bit for bit, also when the block raises."""
    layers = [layer for _, layer in adapted_layers(model)]
    saved = []  # the merged weights themselves: unmerging and merging again would not be bit-exact
    for layer in layers:
        if layer._vp_merged:
            slot_names = {s for name in layer._vp_merged for s in layer.vp_adapters[name]}
            saved.append((layer, dict(layer._vp_merged), {s: layer._vp_kind.snapshot(layer, s) for s in slot_names},
                          dict(layer._vp_premerge)))
    before = [(layer, layer._vp_disabled) for layer in layers]
    try:
        for layer, _, _, _ in saved:
            for name in reversed(list(layer._vp_merged)):  # last merge first: a quantized layer restores exactly
                layer.vp_unmerge(name)
        for layer in layers:
            layer._vp_disabled = True
        yield model
    finally:
        for layer, flag in before:
            layer._vp_disabled = flag
        with torch.no_grad():
            for layer, merged, weights, premerge in saved:
                for slot_name, weight in weights.items():
                    layer._vp_kind.restore(layer, slot_name, weight)
                layer._vp_merged, layer._vp_premerge = merged, premerge


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove one adapter as if it was never attached (unmerged first)."""
    if not isinstance(name, str):
        raise ValueError(f"delete: name={name!r} must be one adapter name; attached: {', '.join(records(model))}")
    check_names(model, name, "delete")
    discard_adapters(model, [name])
    if records(model):
        apply_trainability(model)
    return model


def _strengths(model: nn.Module, scale: Any, names: Any) -> dict[str, float]:
    def number(value: Any) -> bool:
        return isinstance(value, Real) and not isinstance(value, bool)

    if isinstance(scale, dict):
        check_names(model, list(scale), "merge")
        bad = {k: v for k, v in scale.items() if not number(v)}
        if bad:
            raise ValueError(f"merge: strength(s) {bad} must be numbers")
    elif not number(scale):
        raise ValueError(f"merge: scale={scale!r} must be a number or a dict {{adapter name: strength}}")
    if names is None:
        chosen = list(scale) if isinstance(scale, dict) else \
            [n for n, r in records(model).items() if r.active and n not in merged_adapters(model)]
    else:
        chosen = check_names(model, names, "merge")
        if isinstance(scale, dict) and set(chosen) - set(scale):
            raise ValueError(f"merge: no strength for adapter(s) {sorted(set(chosen) - set(scale))} in scale={scale!r}")
    already = sorted(set(chosen) & merged_adapters(model))
    if already:
        raise ValueError(f"merge: adapter(s) {already} are already merged; unmerge first")
    inactive = [n for n in chosen if not records(model)[n].active]
    if inactive:
        raise ValueError(f"merge: adapter(s) {inactive} are inactive; make them active with set_active first")
    return {n: float(scale[n] if isinstance(scale, dict) else scale) for n in chosen}


def merge(model: nn.Module, scale: Any = 1.0, names: Any = None) -> nn.Module:
    """Fold adapters into the base weights (computed in float32, cast back once): ``W = W0 + Σ_k s_k · ΔW_k``.

    ``names``: which adapters (default: every active, unmerged one, or the keys of ``scale`` when it is a dict);
    ``scale``: a number, or ``{name: strength}`` per adapter (e.g. two SaRA styles at 0.6 each). With scale 1 the
    forward is unchanged. Everything is checked before a weight changes.
    On a quantized layer the sum is dequantized, added and requantized: lossy, so one ``RequantizationWarning`` gives
    the number of such layers and the largest max abs error.
    """
    strengths = _strengths(model, scale, names)
    with requantization_summary(model, "vp.merge"):
        for _, layer in adapted_layers(model):
            for name, strength in strengths.items():
                if name in layer.vp_adapters:
                    layer.vp_merge(name, strength)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take out exactly what :func:`merge` folded in; the forward is as before the merge. A quantized layer gets back
    the weight stored before the merge bit for bit when no later merge is still in it (else the subtraction is
    requantized, lossy, with a ``RequantizationWarning``)."""
    with requantization_summary(model, "vp.unmerge"):
        for _, layer in adapted_layers(model):
            for name in reversed(list(layer._vp_merged)):  # last merge first: a quantized layer restores exactly
                layer.vp_unmerge(name)
    return model
