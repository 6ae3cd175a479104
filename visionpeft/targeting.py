"""Which layers (and which weight slots of them) a ``targets`` specification selects."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from torch import nn

from visionpeft.families import find_rule, preset, rule_names
from visionpeft.layers.adapted import ADAPTERS_ATTR, is_adapted, layer_kind
from visionpeft.layers.kinds import KINDS, PARAMETERS_KIND, LayerKind, ParametersKind, WeightKind
from visionpeft.methods.base import Method

#: kinds a family preset may select (a generic ``weight`` module such as an embedding is opt-in)
_PRESET_KINDS = tuple(type(k) for k in KINDS if not isinstance(k, WeightKind))
#: the ``targets`` value that selects every parameter tensor of the model (biases and norms included)
ALL = "all"


@dataclasses.dataclass
class Target:
    name: str
    module: nn.Module
    kind: LayerKind
    slots: list[str]


def _searchable(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, Method) or ADAPTERS_ATTR in name.split("."):
            continue
        yield name, module


def _describe(targets: Any) -> str:
    if isinstance(targets, type):
        return targets.__name__
    return repr(targets)


def _entry_matches(entry: Any, name: str, module: nn.Module) -> bool:
    if isinstance(entry, type):
        return isinstance(module, entry)
    return name == entry or name.endswith("." + entry)


def _mha_parent(model_modules: dict[str, nn.Module], name: str) -> str | None:
    """The name of the MultiheadAttention whose ``out_proj`` this is (its forward never runs)."""
    if not name.endswith("out_proj"):
        return None
    parent = name[: -len("out_proj")].rstrip(".")
    return parent if isinstance(model_modules.get(parent), nn.MultiheadAttention) else None


def resolve_targets(model: nn.Module, targets: Any) -> list[Target]:
    """Every adaptable layer selected by ``targets`` (see :func:`visionpeft.attach`), in model order.

    ``targets="all"`` is a special value, not a regex: every parameter tensor of the module tree, each
    a slot of the module that owns it (:class:`~visionpeft.layers.kinds.ParametersKind`).

    Raises ValueError when the specification is malformed or selects nothing adaptable.
    """
    modules = dict(_searchable(model))
    if isinstance(targets, str) and targets == ALL:
        return _all_parameters(modules)
    _refuse_all_parameter_layers(modules)
    if targets is None:
        chosen = _preset(model, modules)
    elif isinstance(targets, str):
        try:
            regex = re.compile(targets)
        except re.error as err:
            raise ValueError(f"targets={targets!r} is not a valid regular expression: {err}") from None
        chosen = [n for n in modules if regex.fullmatch(n)]
    elif isinstance(targets, type) or (
        isinstance(targets, Sequence) and targets and all(isinstance(t, (str, type)) for t in targets)
    ):
        entries = [targets] if isinstance(targets, type) else list(targets)
        chosen = []
        for entry in entries:
            hits = [n for n, m in modules.items() if _entry_matches(entry, n, m) and _adaptable(modules, n)]
            if not hits:
                raise ValueError(
                    f"target {_describe(entry)} matches no adaptable layer; adaptable layers include: "
                    f"{_examples(modules)}"
                )
            chosen += [h for h in hits if h not in chosen]
    else:
        raise ValueError(
            f"targets={targets!r} is not valid; allowed: None (family preset), a list of module names, "
            f"a regular expression string, a module class or a list of classes"
        )
    return _to_targets(modules, chosen, targets)


def _preset(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """The default targets of the rule that covers ``model``; a clear error where none does."""
    rule = find_rule(model)
    cls = type(model).__name__
    if rule is None:
        raise ValueError(
            f"targets=None: no default-target rule covers {cls} (rules: {'; '.join(rule_names())}). Name the layers "
            f"to adapt, e.g. targets={_first_layers(modules)!r}, or pass a regular expression or a module class")
    chosen = preset(model, rule, list(modules), lambda n: isinstance(layer_kind(modules[n]), _PRESET_KINDS))
    if not chosen:
        raise ValueError(
            f"targets=None: the {rule.name} rule finds no repeated block with adaptable layers in {cls}. Name the "
            f"layers to adapt, e.g. targets={_first_layers(modules)!r}, or pass a regular expression or a module class")
    return chosen


def _first_layers(modules: dict[str, nn.Module], limit: int = 3) -> list[str]:
    """The model's own first few Linear / Conv names (leaf names where those are unambiguous)."""
    names = [n for n, m in modules.items() if n and isinstance(layer_kind(m), _PRESET_KINDS)]
    return names[:limit]


def targets(model: nn.Module, targets: Any = None) -> list[str]:
    """Dry run: ``layer:slot`` for every weight slot that ``attach(model, ..., targets=targets)`` would adapt,
    in model order. Changes nothing; raises the ValueError that attach would raise."""
    return [f"{t.name}:{slot}" for t in resolve_targets(model, targets) for slot in t.slots]


def _all_parameters(modules: dict[str, nn.Module]) -> list[Target]:
    """One target per module owning parameters; a tensor shared by several modules is adapted once."""
    result, seen = [], set()
    for name, module in modules.items():
        if _mha_parent(modules, name) is not None:
            continue  # its parameters are slots of the attention module, whose forward uses them
        if is_adapted(module) and not isinstance(layer_kind(module), ParametersKind):
            raise ValueError(f"targets={ALL!r} cannot adapt {name or type(module).__name__!r}: it already carries an "
                             f"adapter attached with other targets ({layer_kind(module).name} layer); detach it first")
        slots = []
        for slot in PARAMETERS_KIND.slot_names(module):
            owner, attr = PARAMETERS_KIND.parameter(module, slot)
            tensor = owner._parameters[attr]
            if id(tensor) not in seen:
                seen.add(id(tensor))
                slots.append(slot)
        if slots:
            result.append(Target(name, module, PARAMETERS_KIND, slots))
    if not result:
        raise ValueError(f"targets={ALL!r} found no parameter tensor in this model")
    return result


def _refuse_all_parameter_layers(modules: dict[str, nn.Module]) -> None:
    """Layers adapted with ``targets="all"`` expose every tensor as a slot; other targets may not share them."""
    taken = [n or "(root)" for n, m in modules.items() if is_adapted(m) and isinstance(layer_kind(m), ParametersKind)]
    if taken:
        raise ValueError(f"layers adapted with targets={ALL!r} (such as {taken[0]!r}) can only take further "
                         f"adapters with targets={ALL!r}; detach first to use other targets")


def _adaptable(modules: dict[str, nn.Module], name: str) -> bool:
    return layer_kind(modules[name]) is not None or _mha_parent(modules, name) is not None


def _examples(modules: dict[str, nn.Module], limit: int = 8) -> str:
    names = [n for n in modules if n and layer_kind(modules[n]) is not None]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "(none)"


def _to_targets(modules: dict[str, nn.Module], chosen: list[str], spec: Any) -> list[Target]:
    slots: dict[str, list[str]] = {}
    for name in chosen:
        parent = _mha_parent(modules, name)
        if parent is not None:
            slots.setdefault(parent, [])
            if "out_proj" not in slots[parent]:
                slots[parent].append("out_proj")
            continue
        kind = layer_kind(modules[name])
        if kind is None:
            continue
        slots[name] = kind.slot_names(modules[name])  # a whole layer supersedes a single slot
    result = []
    for name, module in modules.items():  # model order
        if name in slots:
            kind = layer_kind(module)
            order = kind.slot_names(module)
            result.append(Target(name, module, kind, [s for s in order if s in slots[name]]))
    if not result:
        raise ValueError(f"targets={_describe(spec)} matches no adaptable layer; adaptable layers include: {_examples(modules)}")
    return result


def match_module_names(model: nn.Module, entries: Sequence[str], what: str) -> list[str]:
    """Module names for PEFT-style name entries (exact or dotted suffix); each entry must match."""
    if isinstance(entries, str):
        entries = [entries]
    modules = dict(_searchable(model))
    found: list[str] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ValueError(f"{what} entry {entry!r} must be a module name (str)")
        hits = [n for n in modules if n and _entry_matches(entry, n, modules[n])]
        if not hits:
            raise ValueError(f"{what} entry {entry!r} matches no module; top-level modules: "
                             f"{', '.join(n for n, _ in model.named_children())}")
        found += [h for h in hits if h not in found]
    return found

