"""What every family rule shares: the rule type and the parts of a model that are never default targets."""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

from torch import nn


@dataclasses.dataclass(frozen=True)
class Rule:
    """One library's default targets.

    ``matches(model)`` says whether the rule covers the model; ``trunk(model)`` returns ``(blocks, never)``: the
    qualified names of the subtrees whose layers are default targets (the repeated blocks) and of subtrees inside
    them that are not (a stem conv, a classifier). The preset then keeps the layers of the preset kinds in
    ``blocks``, minus ``never``, norms and position encodings.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    trunk: Callable[[nn.Module], tuple[list[str], list[str]]]


#: a module inside a norm (an AdaLN's modulation Linear) or a position encoding is never a default target
_NEVER = re.compile(
    r"(^|.*\.)(\w*norm\w*|pos_embed\w*|pos_block|pos_proj|cpb_mlp|rel_pos\w*|relative_position\w*|rope\w*)(\..*|$)",
    re.IGNORECASE)


def excluded(name: str) -> bool:
    return _NEVER.fullmatch(name) is not None


def inside(name: str, prefixes: Iterable[str]) -> bool:
    """``name`` is one of ``prefixes`` or lies below one (``""`` is the whole model)."""
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def class_path(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__name__}"


def from_library(package: str) -> Callable[[nn.Module], bool]:
    def matches(model: nn.Module) -> bool:
        return class_path(model).startswith(package + ".")

    return matches


def outermost_block_lists(model: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> list[str]:
    """The ``nn.ModuleList`` s of the model that no other ModuleList holds: its lists of repeated blocks
    (``encoder.layer``, ``model.layers``, ``transformer.h``, ``transformer_blocks``, ...)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if "vp_adapters" in name.split("."):
            continue  # adapters of an earlier attach
        if isinstance(module, nn.ModuleList) and len(module) and not inside(name, found) and not skip(name):
            found.append(name)
    return [f for f in found if f]
