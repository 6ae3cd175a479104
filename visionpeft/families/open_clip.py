"""open_clip: the residual blocks of both towers (``transformer.resblocks``, ``visual.transformer.resblocks``).

The patch embedding ``visual.conv1``, the token and position embeddings, the projections and an attentional
pooler sit outside the block lists and are never targets. A vision tower built on timm is a timm model inside
(``visual.trunk``) and gets the timm rule's blocks.
"""
from __future__ import annotations

from torch import nn

from visionpeft.families import timm as timm_rule
from visionpeft.families.base import Rule, from_library, outermost_block_lists


def trunk(model: nn.Module) -> tuple[list[str], list[str]]:
    blocks = outermost_block_lists(model, skip=lambda name: "embed" in name or "attn_pool" in name)
    never: list[str] = []
    for name, module in model.named_modules():
        if name and timm_rule.RULE.matches(module):  # a timm trunk inside an open_clip tower
            inner, inner_never = timm_rule.trunk(module)
            blocks = [b for b in blocks if not b.startswith(name + ".")] + [f"{name}.{b}" for b in inner]
            never += [f"{name}.{n}" for n in inner_never]
    return blocks, never


RULE = Rule("open_clip (both towers' residual blocks)", from_library("open_clip"), trunk)
