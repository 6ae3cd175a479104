"""The public operations on a model: attach, detach, and the training hooks (by-name operations: ``by_name.py``).

Attaching is planned first (every input validated, every adapter module built) and installed
after, so a bad call leaves the model exactly as it was.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from typing import Any, Iterator

import torch
from torch import nn

from visionpeft.layers import direct_reads
from visionpeft.layers.adapted import AdaptedLayer, adapt, is_adapted, restore
from visionpeft.layers.kinds import ParametersKind, Slot
from visionpeft.layers.quantized import quantized_storage, requantization_summary
from visionpeft.methods.base import Method, get_method, resolve_options
from visionpeft.targeting import Target, match_module_names, resolve_targets

RECORDS_ATTR = "_vp_records"
TRAINABLE_BEFORE_ATTR = "_vp_trainable_before"


@dataclasses.dataclass
class AdapterRecord:
    """What was attached under one adapter name: enough to attach it again (``vp.load``)."""

    name: str
    method: str
    options: dict[str, Any]
    layers: dict[str, list[str]]
    unfreeze: list[str]
    #: single parameters trained fully with the adapter (e.g. biases of the targeted layers)
    unfreeze_parameters: list[str] = dataclasses.field(default_factory=list)
    #: per layer:slot, relative error of an adapter fitted by ``vp.extract``
    reconstruction_error: dict[str, float] | None = None
    #: attached with ``targets="all"``: every parameter tensor is a slot of the module that owns it
    all_parameters: bool = False
    #: whether the adapter contributes to the output and trains (``vp.set_active``)
    active: bool = True
    #: per layer, options that differ from ``options`` (e.g. a PEFT ``rank_pattern``)
    layer_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Plan:
    record: AdapterRecord
    targets: list[Target]
    instances: dict[str, dict[str, nn.Module]]  # layer -> slot -> Method or ModuleList of Methods
    slots: dict[str, dict[str, Slot]]


def records(model: nn.Module) -> dict[str, AdapterRecord]:
    return model.__dict__.get(RECORDS_ATTR, {})


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in model.named_modules():
        if is_adapted(module):
            yield name, module


def _check_name(model: nn.Module, name: Any, targets: list[Target]) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"adapter name {name!r} is invalid; use a Python identifier such as 'default'")
    taken = [t.name for t in targets if is_adapted(t.module) and name in t.module.vp_adapters]
    if name in records(model) or taken:
        where = f" (already on {', '.join(taken[:3])})" if taken else ""
        raise ValueError(f"an adapter named {name!r} is already attached{where}; attached: "
                         f"{', '.join(records(model)) or '(none)'}. Pick another name or detach it first")


def _split(slot: Slot, weight: torch.Tensor) -> list[tuple[Slot, torch.Tensor]]:
    parts = weight.split(slot.blocks, dim=0)
    return [(dataclasses.replace(slot, label=f"{slot.label}.{i}", shape=tuple(p.shape), blocks=()), p)
            for i, p in enumerate(parts)]


def _resolve_layer_options(cls: type[Method], resolved: dict[str, Any], targets: list[Target],
                           layer_options: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Per-layer overrides checked like the options themselves, only for targeted layers."""
    layer_options = layer_options or {}
    unknown = sorted(set(layer_options) - {t.name for t in targets})
    if unknown:
        raise ValueError(f"{cls.name}: per-layer options for {unknown[:5]}, which are not targeted")
    return {layer: {k: v for k, v in resolve_options(cls, {**resolved, **overrides}).items() if k in overrides}
            for layer, overrides in layer_options.items()}


def _check_storage(cls: type[Method], resolved: dict[str, Any], targets: list[Target]) -> None:
    """Refuse, before anything changes, a method that needs exact weights on a quantized layer, and any weight that
    a kind would read as its raw (quantized) storage."""
    for target in targets:
        if not target.kind.exact_weight:
            try:
                target.kind.check(target.module)
            except ValueError as err:
                raise ValueError(f"{cls.name} cannot adapt {target.name}: {err}") from None
            reason = cls.refuses_quantized(resolved)
            if reason:
                raise ValueError(f"{cls.name} cannot adapt {target.name}: it is a quantized layer ({target.kind.name}) "
                                 f"and {cls.name} {reason}; methods that work on quantized layers: "
                                 f"{', '.join(quantized_methods())}")
            continue
        for slot_name in target.slots:
            owner, attr = target.kind.parameter(target.module, slot_name)
            storage = quantized_storage(owner._parameters.get(attr))
            if storage is not None:
                raise ValueError(f"{cls.name} cannot adapt {target.name}:{slot_name}: its weight is {storage} storage, "
                                 f"which the {target.kind.name} kind would read as raw codes; target the quantized linear "
                                 f"layers themselves (bitsandbytes Linear4bit / Linear8bitLt, torchao Int8Tensor linears)")


def quantized_methods() -> list[str]:
    """The registered methods that adapt quantized layers with their default options."""
    from visionpeft.methods.base import _REGISTRY

    found = []
    for name, cls in sorted(_REGISTRY.items()):
        try:
            if not cls.refuses_quantized(resolve_options(cls, {})):
                found.append(name)
        except ValueError:
            continue
    return found


def plan(model: nn.Module, method: str, targets: list[Target], name: str, unfreeze: list[str],
         options: dict[str, Any], layer_options: dict[str, dict[str, Any]] | None = None) -> Plan:
    cls = get_method(method)
    resolved = resolve_options(cls, options)
    overrides = _resolve_layer_options(cls, resolved, targets, layer_options)
    _check_name(model, name, targets)
    _check_storage(cls, resolved, targets)
    entries: list[tuple[str, str, Slot, torch.Tensor, int | None]] = []
    slots: dict[str, dict[str, Slot]] = {}
    for target in targets:
        slots[target.name] = {}
        for slot_name in target.slots:
            slot = target.kind.slot(target.module, slot_name, target.name)
            weight = target.kind.read(target.module, slot_name).detach()
            slots[target.name][slot_name] = slot
            if cls.split_fused and slot.blocks:
                for i, (block, part) in enumerate(_split(slot, weight)):
                    entries.append((target.name, slot_name, block, part, i))
            else:
                entries.append((target.name, slot_name, slot, weight, None))
    per_slot = cls.prepare([(f"{layer}:{s.label}", s, w) for layer, _, s, w, _ in entries], resolved)
    instances: dict[str, dict[str, nn.Module]] = defaultdict(dict)
    for (layer, slot_name, slot, _, block), opts in zip(entries, per_slot):
        opts = {**opts, **overrides.get(layer, {})}
        try:
            instance = cls(slot, **opts)
        except ValueError as err:
            raise ValueError(f"{cls.name} on {layer}:{slot.label}: {err}") from None
        if block is None:
            instances[layer][slot_name] = instance
        else:
            instances[layer].setdefault(slot_name, nn.ModuleList()).append(instance)
    biases = _biases(model, targets) if cls.trains_bias(resolved) else []
    record = AdapterRecord(name=name, method=cls.name, options=resolved,
                           layers={t.name: list(t.slots) for t in targets}, unfreeze=list(unfreeze),
                           unfreeze_parameters=biases,
                           all_parameters=any(isinstance(t.kind, ParametersKind) for t in targets),
                           layer_options=overrides)
    return Plan(record, targets, dict(instances), slots)


def _biases(model: nn.Module, targets: list[Target]) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for target in targets:
        for slot in target.slots:
            owner = target.kind.bias(target.module, slot)
            if owner is not None:
                prefix = names[id(owner[0])]
                qualified = f"{prefix}.{owner[1]}" if prefix else owner[1]
                if qualified not in found:
                    found.append(qualified)
    return found


def install(model: nn.Module, plan: Plan) -> None:
    # recorded once, before the first adapter, so that detach can restore it
    model.__dict__.setdefault(TRAINABLE_BEFORE_ATTR, {n for n, p in model.named_parameters() if p.requires_grad})
    for target in plan.targets:
        layer = adapt(target.module, target.kind, plan.slots[target.name])
        layer.vp_adapters[plan.record.name] = nn.ModuleDict(plan.instances[target.name])
        if not plan.record.active:
            layer.vp_set_inactive(layer._vp_inactive | {plan.record.name})
    model.__dict__.setdefault(RECORDS_ATTR, {})[plan.record.name] = plan.record
    apply_trainability(model)
    direct_reads.track(model)


def apply_trainability(model: nn.Module) -> None:
    """Only the active adapters train, with the modules and parameters they unfreeze; every other
    parameter is frozen."""
    active = [r for r in records(model).values() if r.active]
    modules = dict(model.named_modules())
    unfrozen = {id(p) for r in active for m in r.unfreeze for p in modules[m].parameters()}
    params = dict(model.named_parameters())
    unfrozen |= {id(params[n]) for r in active for n in r.unfreeze_parameters}
    adapter_params = {}
    for _, layer in adapted_layers(model):
        for adapter, slots in layer.vp_adapters.items():
            for param in slots.parameters():
                adapter_params[id(param)] = adapter in records(model) and records(model)[adapter].active
    for param in model.parameters():
        param.requires_grad_(adapter_params.get(id(param), id(param) in unfrozen))


def attach(model: nn.Module, method: str, *, targets: Any = None, unfreeze: Any = (), name: str = "default",
           **options: Any) -> nn.Module:
    """Add ``method``'s adapter to the selected layers of ``model``, in place, and return ``model``.

    Every base parameter is frozen; afterwards only the adapter's parameters and those of the
    modules named in ``unfreeze`` are trainable. The output is unchanged by attaching.

    Args:
        model: any ``nn.Module``.
        method: a name from ``vp.methods()`` (``"lora"``, ...).
        targets: ``None`` for the family preset (every weight of the repeated blocks), a list of
            module names (exact or dotted suffix), a regular expression (full match), a module
            class / list of classes, or the special value ``"all"``: every parameter tensor of the
            model (biases, norms, embeddings included), each a slot of the module that owns it.
        unfreeze: module names trained fully and saved with the adapter (e.g. ``["head"]``).
        name: the adapter's name; several adapters may be attached under different names.
        **options: the method's hyper-parameters (``rank``, ``alpha``, ``dropout``, ...).

    Raises:
        ValueError: unknown method or option, bad value, targets that match nothing, or a name
            already attached. The model is left untouched.
    """
    get_method(method)  # the method's name is checked before anything else
    chosen = resolve_targets(model, targets)
    unfrozen = match_module_names(model, unfreeze, "unfreeze") if unfreeze else []
    install(model, plan(model, method, chosen, name, unfrozen, options))
    return model


def _methods(model: nn.Module) -> Iterator[tuple[str, Method]]:
    for _, layer in adapted_layers(model):
        for adapter, _, method in layer.vp_methods():
            yield adapter, method


def detach(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every adapter and give each layer back its original class.

    ``merge=True`` keeps the adapted behaviour (the merged and the active adapters) folded into the
    weights; ``merge=False`` restores the original model (merged adapters are taken out again).
    Trainability flags are restored as they were before the first attach.
    """
    with requantization_summary(model, "vp.detach"):
        for _, layer in list(adapted_layers(model)):
            if merge:
                for adapter in layer.vp_adapters:
                    if adapter not in layer._vp_merged and adapter not in layer._vp_inactive:
                        layer.vp_merge(adapter, 1.0)
            else:
                for adapter in reversed(list(layer._vp_merged)):  # last merge first: a quantized layer restores exactly
                    layer.vp_unmerge(adapter)
            restore(layer)
    direct_reads.track(model)
    trainable = model.__dict__.pop(TRAINABLE_BEFORE_ATTR, None)
    if trainable is not None:
        for param_name, param in model.named_parameters():
            param.requires_grad_(param_name in trainable)
    model.__dict__.pop(RECORDS_ATTR, None)
    return model


def discard_adapters(model: nn.Module, names) -> None:
    """Remove the adapters ``names`` from ``model`` as if never attached (merged ones are taken out first); the
    model's other adapters stay."""
    names = set(names)
    if not names:
        return
    if names >= set(records(model)):
        detach(model, merge=False)
        return
    for _, layer in list(adapted_layers(model)):
        for name in names & set(layer.vp_adapters):
            if name in layer._vp_merged:
                layer.vp_unmerge(name)
            del layer.vp_adapters[name]
            layer.vp_set_inactive(layer._vp_inactive - {name})
        if not len(layer.vp_adapters):
            restore(layer)
    direct_reads.track(model)
    for name in names:
        records(model).pop(name, None)


@contextlib.contextmanager
def adapters_rolled_back_on_error(*models: nn.Module):
    """Run a block that attaches adapters to ``models``; if it raises, every adapter it attached is removed again
    (unmerged) and the trainability flags are restored, so each model is left as it was."""
    before = [(m, set(records(m)), {n: p.requires_grad for n, p in m.named_parameters()}) for m in models]
    try:
        yield
    except BaseException:
        for model, names, trainable in before:
            discard_adapters(model, set(records(model)) - names)
            for name, param in model.named_parameters():
                param.requires_grad_(trainable.get(name, param.requires_grad))
        raise


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters an optimizer should receive: every parameter that requires grad."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _by_method(model: nn.Module) -> dict[tuple[str, type], list[Method]]:
    """The active adapters' method instances, per adapter and method (an inactive adapter neither trains nor schedules)."""
    groups: dict[tuple[str, type], list[Method]] = defaultdict(list)
    active = {name for name, record in records(model).items() if record.active}
    for adapter, method in _methods(model):
        if adapter in active:
            groups[(adapter, type(method))].append(method)
    return groups


def regularization(model: nn.Module) -> torch.Tensor:
    """The sum of the attached methods' penalties (a 0-dim tensor; zero when none has one)."""
    total = None
    for (_, cls), instances in _by_method(model).items():
        term = cls.model_penalty(instances)
        if term is not None:
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


def step(model: nn.Module, step: int, total_steps: int) -> None:
    """Advance the methods' schedules (sparsity allocation, re-selection) to ``step`` of ``total_steps``."""
    if not isinstance(step, int) or not isinstance(total_steps, int) or total_steps < 1 or not 0 <= step <= total_steps:
        raise ValueError(f"step={step!r}, total_steps={total_steps!r}: need ints with 0 <= step <= total_steps, total_steps >= 1")
    for (_, cls), instances in _by_method(model).items():
        cls.model_step(instances, step, total_steps)
