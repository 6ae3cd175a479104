"""Default targets (``targets=None``): one rule per library, each read from the model's own structure.

Every rule returns the model's repeated blocks (timm: from ``pretrained_cfg`` and ``feature_info``; diffusers
and transformers: from their block lists; open_clip: its towers' residual blocks). The preset is every layer of
a preset kind (Linear, Conv, transformers' Conv1D, MultiheadAttention) inside them, never a norm's layer or a
position encoding's (:func:`visionpeft.families.base.excluded`). A new library's rule is one module here with a
``RULE``, added to :data:`RULES`; nothing else changes.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from visionpeft.families import diffusers, open_clip, timm, transformers
from visionpeft.families.base import Rule, excluded, inside

#: tried in order; the first whose ``matches`` is true decides
RULES: tuple[Rule, ...] = (timm.RULE, open_clip.RULE, diffusers.RULE, transformers.RULE)


def find_rule(model: nn.Module) -> Rule | None:
    return next((rule for rule in RULES if rule.matches(model)), None)


def preset(model: nn.Module, rule: Rule, names: list[str], eligible: Callable[[str], bool]) -> list[str]:
    """The names among ``names`` (model order) that ``rule`` makes default targets; ``eligible(name)`` says
    whether the module is of a preset kind."""
    blocks, never = rule.trunk(model)
    return [n for n in names if n and inside(n, blocks) and not inside(n, never) and not excluded(n) and eligible(n)]


def rule_names() -> list[str]:
    return [rule.name for rule in RULES]


__all__ = ["RULES", "Rule", "find_rule", "preset", "rule_names"]
