"""diffusers, every UNet and diffusion transformer, from their block lists.

The trunk is every list of blocks at the top of the model (``down_blocks`` / ``up_blocks`` of a UNet,
``transformer_blocks`` and ``single_transformer_blocks`` of SD3, FLUX, PixArt, Sana, AuraFlow, CogVideoX, Mochi,
``blocks`` of Wan and HunyuanDiT, ``layers`` and the refiners of Lumina) and a UNet's ``mid_block``. So attention
q/k/v/out, the ``add_*`` projections of joint attention, feed-forwards and a UNet's resnet convs (with their time
projections and the stage's down/upsamplers) are targets; ``conv_in`` / ``conv_out``, ``proj_out``, ``norm_out``
and the patch, timestep, text, pooled and guidance embedders sit outside the lists and never are. Inside a block,
the modulation Linear of an AdaLN norm (``norm1.linear``) is a norm's and is not a target either.

A layer whose output cannot reach the model's output is never a target: an adapter there would train nothing.
diffusers marks the one such case in its joint attention itself: an attention with ``context_pre_only`` set (the
last joint block of SD3 and Mochi) returns no context stream (it has no ``to_add_out``), so its context query
projection ``add_q_proj`` feeds rows that are dropped, while ``add_k_proj`` / ``add_v_proj`` still feed the image
tokens' attention and stay targets.
"""
from __future__ import annotations

from torch import nn

from visionpeft.families.base import Rule, from_library, outermost_block_lists


def _top_level_lists(model: nn.Module) -> list[str]:
    return [name for name, child in model.named_children()
            if isinstance(child, nn.ModuleList) and len(child) or name.endswith("mid_block") and child is not None]


def _unused_context_queries(model: nn.Module) -> list[str]:
    """``add_q_proj`` of every attention whose context stream ends there (``context_pre_only``): its output is
    dropped, so it gets no gradient."""
    return [f"{name}.add_q_proj" if name else "add_q_proj" for name, module in model.named_modules()
            if getattr(module, "context_pre_only", None) is True and isinstance(getattr(module, "add_q_proj", None),
                                                                                nn.Module)]


def trunk(model: nn.Module) -> tuple[list[str], list[str]]:
    blocks = _top_level_lists(model)
    if not blocks:  # a wrapper holding the model one level down (a ControlNet's union, a prior)
        blocks = outermost_block_lists(model, skip=lambda name: "embed" in name)
    return blocks, _unused_context_queries(model)


RULE = Rule("diffusers (UNet down/mid/up blocks, transformer block lists)", from_library("diffusers"), trunk)
