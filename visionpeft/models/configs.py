"""Tiny, randomly initialised models of every supported family, built from configs (no downloads).

``build(family, **overrides)`` returns ``(model, example_inputs)`` where ``model(**inputs)`` or
``model(*inputs)`` runs a forward. Sizes are chosen so a forward takes milliseconds on a CPU.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def timm_vit(**kw: Any):
    import timm

    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5) | kw
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg), (torch.randn(2, 3, cfg["img_size"], cfg["img_size"]),)


def timm_convnext(**kw: Any):
    from timm.models.convnext import ConvNeXt

    cfg = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5, ls_init_value=1.0) | kw
    return ConvNeXt(**cfg), (torch.randn(2, 3, 32, 32),)


def timm_resnet(**kw: Any):
    from timm.models.resnet import BasicBlock, ResNet

    cfg = dict(block=BasicBlock, layers=(1, 1, 1, 1), num_classes=5, stem_width=16) | kw
    return ResNet(**cfg), (torch.randn(2, 3, 32, 32),)


def open_clip_model(**kw: Any):
    import open_clip

    cfg = dict(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2.0),
        text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=2),
    ) | kw
    model = open_clip.CLIP(**cfg)
    return model, (torch.randn(2, 3, 32, 32), torch.randint(0, 64, (2, 8)))


def transformers_clip(**kw: Any):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16, **kw,
    )
    model = CLIPModel(config)
    return model, {"input_ids": torch.randint(0, 64, (2, 8)), "pixel_values": torch.randn(2, 3, 32, 32)}


def _unet(cfg: dict[str, Any], text_tokens: int):
    """A diffusers UNet2DConditionModel from ``cfg`` and a batch of 2 for it."""
    from diffusers import UNet2DConditionModel

    size = cfg["sample_size"]
    return UNet2DConditionModel(**cfg), {
        "sample": torch.randn(2, cfg["in_channels"], size, size), "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, text_tokens, cfg["cross_attention_dim"])}


def diffusers_unet(**kw: Any):
    cfg = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ) | kw
    return _unet(cfg, text_tokens=5)


def sd15_like_unet(**kw: Any):
    """SD-1.5's UNet block structure (3 cross-attention down blocks + 1 plain, mirrored up, 2 layers per
    block, 8 heads) at a width and latent size that fit a 2-core CPU; pass the real sizes on a GPU:
    ``block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, sample_size=64``."""
    cfg = dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32,
    ) | kw
    return _unet(cfg, text_tokens=77)


def llama(**kw: Any):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, **kw)
    return LlamaForCausalLM(config), {"input_ids": torch.randint(0, 64, (2, 8))}


def gpt2(**kw: Any):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=1, **kw)
    return GPT2LMHeadModel(config), {"input_ids": torch.randint(0, 64, (2, 8))}


FAMILY_BUILDERS: dict[str, Callable[..., tuple[nn.Module, Any]]] = {
    "timm_vit": timm_vit,
    "timm_convnext": timm_convnext,
    "timm_resnet": timm_resnet,
    "open_clip": open_clip_model,
    "transformers_clip": transformers_clip,
    "diffusers_unet": diffusers_unet,
    "sd15_like_unet": sd15_like_unet,
    "llama": llama,
    "gpt2": gpt2,
}


def build(family: str, **overrides: Any) -> tuple[nn.Module, Any]:
    if family not in FAMILY_BUILDERS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILY_BUILDERS)}")
    return FAMILY_BUILDERS[family](**overrides)
