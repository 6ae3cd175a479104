"""The one wrapper for every layer kind: the host module keeps its class (as a base), its
parameters and its state_dict keys; adapters live under the new child ``vp_adapters``.

Attaching swaps the module's class for a subclass ``Adapted<Class>`` whose forward runs the base
op with ``W + ΔW`` (weight path) and/or adds a method's output delta (activation path). A method that is
the only adapter on a slot may take its gradient from the op's input and output gradient instead of
through the weight (``gradient_from_output``: the op then runs with a constant ``W + ΔW`` and computes no
weight gradient). Detaching swaps the class back. ``isinstance`` checks of the host code keep working throughout.
"""
from __future__ import annotations

import itertools
import sys
from typing import Any, Iterator

import torch
from torch import nn

from visionpeft.layers import direct_reads
from visionpeft.layers.kinds import REBUILD_ATTR, LayerKind, Slot, kind_of

ADAPTERS_ATTR = "vp_adapters"
_CLASS_CACHE: dict[type, type] = {}


def _fused(blocks: list[torch.Tensor]) -> torch.Tensor:
    """The blocks' effective weights concatenated; rebuilt in backward when every block can be."""
    fused = torch.cat(blocks, dim=0)
    if torch.compiler.is_compiling():  # nothing is rebuilt in a compiled graph (layers.kinds.rebuildable)
        return fused
    rebuilds = [getattr(block, REBUILD_ATTR, None) for block in blocks]
    if all(rebuilds):
        setattr(fused, REBUILD_ATTR, lambda: torch.cat([rebuild() for rebuild in rebuilds], dim=0))
    return fused


class _MergedGuard(torch.autograd.Function):
    """Passes a layer's output through; backward through a layer whose trainable adapters are merged raises."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, names: list[str], *params: torch.Tensor) -> torch.Tensor:
        ctx.names = names
        return out.clone()  # not a view: the host may change the output in place

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"backward through merged adapter(s) {ctx.names}: they are folded into the weights and "
                           f"cannot train; call vp.unmerge(model) before training (or freeze them)")


class AdaptedLayer:
    """Mixin placed before the host's class in the MRO of ``Adapted<Class>``."""

    _vp_base_class: type
    _vp_kind: LayerKind
    _vp_slots: dict[str, Slot]
    _vp_merged: dict[str, float]
    #: per merged adapter, the stored weights from before its merge (kinds whose writes are lossy)
    _vp_premerge: dict[str, dict[str, Any]]
    #: adapters that stay attached but neither contribute nor train (``vp.set_active``)
    _vp_inactive: frozenset = frozenset()
    #: inside ``vp.disabled``: the base op alone
    _vp_disabled: bool = False
    #: inside ``vp.routing``: runs each group of samples with its own adapter (``visionpeft.routing.Route``)
    _vp_route: Any = None

    # --- forward -----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state = self.__dict__
        state[direct_reads.OWN_ATTR] = state.get(direct_reads.OWN_ATTR, 0) + 1
        try:
            if self._vp_route is not None:
                return self._vp_route.run(self, args, kwargs)
            if self._vp_disabled:
                return self._vp_base_class.forward(self, *args, **kwargs)
            names = [name for name in self.vp_adapters if name not in self._vp_merged and name not in self._vp_inactive]
            out = self.vp_forward(args, kwargs, names)
        finally:
            state[direct_reads.OWN_ATTR] -= 1
        if self._vp_route is None and not self._vp_disabled and self._vp_merged and torch.is_grad_enabled() \
                and isinstance(out, torch.Tensor):
            merged = [p for name in self._vp_merged for p in self.vp_adapters[name].parameters() if p.requires_grad]
            if merged:  # their gradient would be silently lost: say so at backward
                out = _MergedGuard.apply(out, sorted(self._vp_merged), *merged)
        return out

    def __getattr__(self, name: str) -> Any:
        # an enclosing forward reading a slot's weight directly gets W + ΔW (layers/direct_reads.py)
        value = super().__getattr__(name)
        if direct_reads.read_from_outside(self, name):
            return direct_reads.carried_weight(self, name, value)
        return value

    def vp_forward(self, args: tuple, kwargs: dict, names: list[str]) -> Any:
        """The forward with exactly the (unmerged) adapters ``names`` applied."""
        base_forward = self._vp_base_class.forward
        active = [(name, self.vp_adapters[name]) for name in names]
        if not active:
            return base_forward(self, *args, **kwargs)
        kind = self._vp_kind
        x = args[0] if kind.single_input and args else None
        weights: dict[str, torch.Tensor] = {}
        output_deltas = []
        taps = []  # (method, slot, its rows of the output): gradient from the op's input and output gradient

        def sole(slot_name: str) -> bool:
            return sum(slot_name in slots for _, slots in active) == 1

        def effective(method: nn.Module, base: torch.Tensor, slot_name: str, rows: slice) -> torch.Tensor:
            slot = self._vp_slots[slot_name]
            if x is not None and method.gradient_from_output(slot) and sole(slot_name):
                taps.append((method, slot, rows))
                with torch.no_grad():
                    return method.effective_weight(base)
            return method.effective_weight(base)

        for _, slots in active:
            for slot_name, methods in slots.items():
                slot = self._vp_slots[slot_name]
                if isinstance(methods, nn.ModuleList):  # fused projection adapted per block
                    base = weights.get(slot_name, kind.read(self, slot_name))
                    parts = base.split(slot.block_split(), dim=0)
                    starts = itertools.accumulate((p.shape[0] for p in parts), initial=0)
                    weights[slot_name] = _fused([effective(m, p, slot_name, slice(start, start + p.shape[0]))
                                                 for m, p, start in zip(methods, parts, starts)])
                elif x is not None and methods.uses_activation_path(slot) and (not methods.reads_base or sole(slot_name)):
                    output_deltas.append((methods, slot, slot_name))
                else:
                    base = weights.get(slot_name, kind.read(self, slot_name))
                    weights[slot_name] = effective(methods, base, slot_name, slice(None))
        if weights:
            out = kind.run(self, base_forward, args, kwargs, weights)
        else:
            out = base_forward(self, *args, **kwargs)
        for method, slot, rows in taps:
            out = method.tap_output(x, out, slot, rows)
        for method, slot, slot_name in output_deltas:
            if method.reads_base:  # the base output is W0·x + b here: no other adapter acts on this slot
                out = method.add_output_delta(x, out, slot, *self.vp_base(slot_name))
            else:
                out = method.add_output_delta(x, out, slot)
        return out

    def vp_base(self, slot_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The slot's weight (canonical orientation) and the bias its op adds, for methods that read them."""
        where = self._vp_kind.bias(self, slot_name)
        return self._vp_kind.read(self, slot_name), None if where is None else getattr(*where)

    # --- weights -----------------------------------------------------------------------------
    def vp_delta(self, adapter: str, slot_name: str) -> torch.Tensor:
        """The adapter's full delta for one slot in float32, fused blocks concatenated."""
        methods = self.vp_adapters[adapter][slot_name]
        if isinstance(methods, nn.ModuleList):
            return torch.cat([m.delta().float() for m in methods], dim=0)
        if methods.reads_base:
            return methods.delta(self._vp_kind.read(self, slot_name)).float()
        return methods.delta().float()

    def vp_merge(self, adapter: str, scale: float) -> None:
        if not self._vp_kind.exact_weight:  # a write requantizes: keep the stored weight, to unmerge exactly
            self._vp_premerge[adapter] = {s: self._vp_kind.snapshot(self, s) for s in self.vp_adapters[adapter]}
        self._vp_fold(adapter, scale, merge=True)
        self._vp_merged[adapter] = scale

    def vp_unmerge(self, adapter: str) -> None:
        later = list(self._vp_merged)[list(self._vp_merged).index(adapter) + 1:]
        scale = self._vp_merged.pop(adapter)
        stored = self._vp_premerge.pop(adapter, None)
        for name in later:  # their stored weights hold this adapter's merge
            self._vp_premerge.pop(name, None)
        self._vp_fold(adapter, scale, merge=False, stored=None if later else stored)

    @torch.no_grad()
    def _vp_fold(self, adapter: str, scale: float, merge: bool, stored: dict | None = None) -> None:
        """Add (merge) or subtract the adapter's scaled ΔW; ``stored``: the weights as stored before the merge (a
        quantized kind's snapshot), put back as they were instead of subtracting and requantizing."""
        for slot_name, methods in self.vp_adapters[adapter].items():
            weight = self._vp_kind.read(self, slot_name)
            if getattr(methods, "reads_base", False):  # ΔW depends on W0: the method inverts its own merge
                folded = methods.merged_weight(weight, scale) if merge else methods.unmerged_weight(weight, scale)
                bias_at = self._vp_kind.bias(self, slot_name) if self._vp_kind.single_input else None
                if bias_at is not None and hasattr(methods, "folded_bias"):  # α-LoRA's scaled bias
                    bias = getattr(*bias_at)
                    bias.copy_(methods.folded_bias(bias, self._vp_slots[slot_name], scale, merge))
            elif stored is None:
                delta = self.vp_delta(adapter, slot_name).to(weight.device)
                folded = weight.float() + (scale if merge else -scale) * delta
            if stored is not None:
                self._vp_kind.restore(self, slot_name, stored[slot_name])
            else:
                self._vp_kind.write(self, slot_name, folded.to(weight.dtype))

    def vp_set_inactive(self, names) -> None:
        self._vp_inactive = frozenset(names)

    def vp_methods(self) -> Iterator[tuple[str, str, nn.Module]]:
        for adapter, slots in self.vp_adapters.items():
            for slot_name, methods in slots.items():
                for method in (methods if isinstance(methods, nn.ModuleList) else [methods]):
                    yield adapter, slot_name, method

    def extra_repr(self) -> str:
        base = self._vp_base_class.extra_repr(self)
        merged = f", merged={sorted(self._vp_merged)}" if self._vp_merged else ""
        inactive = f", inactive={sorted(self._vp_inactive)}" if self._vp_inactive else ""
        return f"{base}, adapters={list(self.vp_adapters)}{merged}{inactive}"


def _adapted_class(base: type) -> type:
    cls = _CLASS_CACHE.get(base)
    if cls is None:
        name = f"Adapted{base.__name__}"
        module_globals = vars(sys.modules[__name__])
        if name in module_globals and getattr(module_globals[name], "_vp_base_class", None) is not base:
            name = f"{name}_{len(_CLASS_CACHE)}"
        cls = type(name, (AdaptedLayer, base), {"_vp_base_class": base, "__module__": __name__, "__qualname__": name})
        module_globals[name] = cls  # importable by name, so pickling an adapted model works
        _CLASS_CACHE[base] = cls
    return cls


def is_adapted(module: nn.Module) -> bool:
    return isinstance(module, AdaptedLayer)


def adapt(module: nn.Module, kind: LayerKind, slots: dict[str, Slot]) -> AdaptedLayer:
    """Turn ``module`` into its adapted class in place (idempotent); returns it."""
    if not is_adapted(module):
        module.__class__ = _adapted_class(type(module))
        module._vp_kind = kind
        module._vp_slots = dict(slots)
        module._vp_merged = {}
        module._vp_premerge = {}
        module.add_module(ADAPTERS_ATTR, nn.ModuleDict())
    else:
        module._vp_slots.update(slots)
    module.__dict__[direct_reads.DIRECT_ATTR] = direct_reads.direct_slots(module, kind, module._vp_slots)
    return module


def restore(module: AdaptedLayer) -> nn.Module:
    """Back to the original class, with no adapters; the weights are left as they are."""
    base = module._vp_base_class
    del module._modules[ADAPTERS_ATTR]
    for attr in ("_vp_kind", "_vp_slots", "_vp_merged", "_vp_premerge", "_vp_inactive", "_vp_disabled", "_vp_route",
                 direct_reads.DIRECT_ATTR, direct_reads.OWN_ATTR):
        module.__dict__.pop(attr, None)
    module.__class__ = base
    return module


def layer_kind(module: nn.Module) -> LayerKind | None:
    if is_adapted(module):
        return module._vp_kind
    return kind_of(module)
