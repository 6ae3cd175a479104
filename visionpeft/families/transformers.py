"""transformers, generically: the model's lists of layers.

Every outermost ``nn.ModuleList`` of a ``PreTrainedModel`` is its stack of repeated layers: ``encoder.layer``
(ViT, DINOv2), ``encoder.layers`` (CLIP, SigLIP, both towers), ``encoder.layers`` with their blocks and patch
merging (Swin), ``encoder.stages`` (ConvNeXt), ``model.layers`` (Llama, Qwen, Mistral, Gemma, Phi),
``transformer.h`` (GPT-2), ``gpt_neox.layers``. Their attention and MLP projections are the targets; the
embeddings, ``lm_head``, classifier and pooler heads (SigLIP's attention-pool head included) hold no such list
and never are. Lists inside an embedding module are skipped.
"""
from __future__ import annotations

from torch import nn

from visionpeft.families.base import Rule, from_library, outermost_block_lists


def trunk(model: nn.Module) -> tuple[list[str], list[str]]:
    return outermost_block_lists(model, skip=lambda name: "embed" in name or "head" in name.split(".")), []


RULE = Rule("transformers (every PreTrainedModel's lists of layers)", from_library("transformers"), trunk)
