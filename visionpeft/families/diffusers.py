"""diffusers, every UNet and diffusion transformer, from their block lists.

The trunk is every list of blocks at the top of the model (``down_blocks`` / ``up_blocks`` of a UNet,
``transformer_blocks`` and ``single_transformer_blocks`` of SD3, FLUX, PixArt, Sana, ``blocks`` of Wan and
HunyuanDiT, ``layers`` and the refiners of Lumina) and a UNet's ``mid_block``. So attention q/k/v/out, the
``add_*`` projections of joint attention, feed-forwards and a UNet's resnet convs (with their time projections
and the stage's down/upsamplers) are targets; ``conv_in`` / ``conv_out``, ``proj_out``, ``norm_out`` and the
patch, timestep, text, pooled and guidance embedders sit outside the lists and never are. Inside a block, the
modulation Linear of an AdaLN norm (``norm1.linear``) is a norm's and is not a target either.
"""
from __future__ import annotations

from torch import nn

from visionpeft.families.base import Rule, from_library, outermost_block_lists


def _top_level_lists(model: nn.Module) -> tuple[list[str], list[str]]:
    blocks = [name for name, child in model.named_children()
              if isinstance(child, nn.ModuleList) and len(child) or name.endswith("mid_block") and child is not None]
    return blocks, []


def trunk(model: nn.Module) -> tuple[list[str], list[str]]:
    blocks, never = _top_level_lists(model)
    if not blocks:  # a wrapper holding the model one level down (a ControlNet's union, a prior)
        blocks = outermost_block_lists(model, skip=lambda name: "embed" in name)
    return blocks, never


RULE = Rule("diffusers (UNet down/mid/up blocks, transformer block lists)", from_library("diffusers"), trunk)
