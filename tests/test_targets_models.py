"""targets=None on a broad sample of timm, diffusers and transformers models, each built tiny from its config:
something is targeted, never a head, stem, embedder, norm or position encoding; attach changes nothing; every
adapter tensor gets a gradient; merge is exact. One method (LoRA) across all models: the other methods are
covered on every layer kind elsewhere."""
import copy
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import visionpeft as vp
from conftest import max_rel, perturb

timm = pytest.importorskip("timm")

#: (timm name, model kwargs, input side); each small enough for a CPU forward in milliseconds
TIMM = [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    ("vit_base_patch16_siglip_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2), 28),
    ("beit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)), 32),
    ("swinv2_tiny_window8_256", dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)), 32),
    ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), 32),
    ("resnet18", dict(layers=(1, 1, 1, 1)), 32),
    ("resnet26d", dict(layers=(1, 1, 1, 1)), 32),
    ("mobilenetv3_small_050", dict(), 32),
    ("regnetx_002", dict(), 32),
    ("fastvit_t8", dict(), 64),
    ("pvt_v2_b0", dict(), 32),
    ("densenet121", dict(growth_rate=8, block_config=(1, 1, 1, 1)), 32),
    ("inception_v3", dict(), 75),
    ("xcit_nano_12_p16_224", dict(img_size=32, depth=2), 32),
    ("cait_xxs24_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, depth_token_only=1, num_heads=2), 32),
    ("mobilevit_xxs", dict(), 64),
    ("ghostnet_050", dict(), 32),
    ("davit_tiny", dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4)), 64),
    ("vgg11", dict(), 32),
    ("dla34", dict(levels=(1, 1, 1, 1, 1, 1), channels=(8, 16, 16, 32, 32, 64)), 32),
    # narrow: at full width the filled residual norms make activations overflow and saturate the softmax
    ("levit_128s", dict(img_size=64, embed_dim=(16, 32, 48), key_dim=4, num_heads=(2, 2, 2), depth=(1, 1, 1)), 64),
    # weight_init="skip": timm's ViT init zeroes Hiera's classifier, so the output would be constant
    ("hiera_tiny_224", dict(img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), weight_init="skip"), 64),
    ("edgenext_xx_small", dict(), 64),
    ("twins_pcpvt_small", dict(depths=(1, 1, 1, 1)), 64),
    ("convnextv2_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), 32),
    ("test_efficientnet", dict(), 32),
    ("poolformer_s12", dict(), 32),
    ("regnety_002", dict(), 32),
    ("repvit_m0_9", dict(), 64),
    ("maxvit_rmlp_pico_rw_256", dict(img_size=64), 64),
    # the BiT entrypoints fix depths and widths: the full model, on a small input
    ("resnetv2_50x1_bit", dict(), 32),
    ("caformer_s18", dict(), 64),
    ("mixer_s16_224", dict(img_size=32), 32),
    # its attention biases are sized for a 7x7 last stage, i.e. a 224 px input
    ("efficientformer_l1", dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64)), 224),
]


def _timm_model(name, kw):
    return timm.create_model(name, pretrained=False, num_classes=4, **kw)


def _collect(value, found):
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dim() > 0:
            found.append(value.flatten())
    elif isinstance(value, dict) or hasattr(value, "to_tuple"):
        for item in value.values():
            _collect(item, found)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _collect(item, found)
    return found


def run(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return torch.cat(_collect(out, []))


def exercise(model, inputs, never):
    """The checks every model gets; ``never`` are module names (and their subtrees) that must not be targeted."""
    model.eval()
    # random init zeroes residual gains (timm's zero_init_last, layer scales of 1e-5 or 0) and some heads
    # (MLP-Mixer's): every branch gets a gradient only once they carry signal
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() <= 1 and param.numel() > 1 and param.abs().max() < 1e-3:
                param.fill_(1.0)
            elif param.dim() > 1 and not param.any():
                param.normal_(std=0.02)
    listed = vp.targets(model)
    assert listed, "targets=None selects nothing"
    layers = [entry.split(":")[0] for entry in listed]
    for layer in layers:
        assert not any(layer == n or layer.startswith(n + ".") for n in never), f"{layer} is a head/stem/embedder"
        assert not re.search(r"(^|\.)\w*(norm|embed|pos_|lm_head|wte|wpe)\w*(\.|$)", layer, re.I), layer
    # the reference is the frozen base, as attach leaves it: torch picks some kernels by requires_grad (matmul folds
    # a non-contiguous batch into one mm only for a weight that needs a gradient, SDPA leaves its fused kernel for a
    # mask that needs one), so freezing alone may move the last bit of SigLIP's pooling head or Swin's windows
    model.requires_grad_(False)
    y0 = run(model, inputs)
    state = copy.deepcopy(model.state_dict())
    vp.attach(model, "lora", rank=2)
    assert [f"{n}:{s}" for n, m in model.named_modules() if hasattr(m, "vp_adapters") for s in m._vp_slots] == listed
    assert torch.equal(run(model, inputs), y0), "attach must not change the output"
    # large enough to move every output; 0.3 pushed random trunks into saturation (RepViT's SE gates reached a
    # sigmoid of exactly 1, so their fc1 got a zero gradient) or into a regime that amplifies the merged weights'
    # float round-off past 1e-4 (RegNetY, MaxViT; each of their layers alone merges to 1e-6)
    perturb(model, std=0.1)
    y1 = run(model, inputs)
    assert max_rel(y1, y0) > 1e-5
    y1.float().square().mean().backward()
    for name, param in vp.trainable_parameters(model).items():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} gets no gradient"
    with torch.no_grad():
        y1 = run(model, inputs)
        vp.merge(model)
        assert max_rel(run(model, inputs), y1) < 1e-4
        vp.unmerge(model)
    vp.detach(model, merge=False)
    assert all(torch.allclose(v, state[k], atol=1e-6) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name, kw, size", TIMM, ids=[t[0] for t in TIMM])
def test_timm(name, kw, size):
    model = _timm_model(name, kw)
    # the reference output is the frozen base's, as attach leaves it: torch's CPU attention picks its kernel by
    # whether a bias needs a gradient (MaxViT's rel-pos MLP), which moves the output by float round-off
    model.requires_grad_(False)
    cfg = model.pretrained_cfg
    never = [n for key in ("first_conv", "classifier") for n in
             ([cfg[key]] if isinstance(cfg.get(key), str) else list(cfg.get(key) or ()))]
    exercise(model, (torch.randn(2, 3, size, size),), never)


# --- diffusers ---------------------------------------------------------------------------------------------------
def _unet(sdxl=False):
    from diffusers import UNet2DConditionModel

    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=32,
                 transformer_layers_per_block=(1, 1)) if sdxl else {}
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8, **extra)
    inputs = {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(2, 5, 16)}
    if sdxl:  # pooled text embedding (32 - 6 time ids x 4) and the six size/crop ids
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 8), "time_ids": torch.rand(2, 6) * 64}
    never = ["conv_in", "conv_out", "time_embedding", "add_embedding", "add_time_proj", "conv_norm_out"]
    return model, inputs, never


def _sd3(dual_attention=False):
    """SD3 (and SD3.5's dual attention in its first block); the last joint block has ``context_pre_only``."""
    from diffusers import SD3Transformer2DModel

    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if dual_attention else {}
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8, **extra)
    inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 5, 16),
              "pooled_projections": torch.randn(2, 8), "timestep": torch.tensor([10, 500])}
    return model, inputs, ["pos_embed", "time_text_embed", "context_embedder", "norm_out", "proj_out"]


def _flux():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    inputs = {"hidden_states": torch.randn(2, 16, 8), "encoder_hidden_states": torch.randn(2, 5, 16),
              "pooled_projections": torch.randn(2, 8), "timestep": torch.tensor([0.1, 0.7]),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3), "guidance": torch.tensor([3.5, 3.5])}
    return model, inputs, ["x_embedder", "time_text_embed", "context_embedder", "norm_out", "proj_out"]


def _pixart():
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                     caption_channels=12, norm_num_groups=8)
    inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 5, 12),
              "timestep": torch.tensor([10, 500]),
              "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return model, inputs, ["pos_embed", "adaln_single", "caption_projection", "proj_out"]


def _sana():
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                   cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=1)
    inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 5, 12),
              "timestep": torch.tensor([10, 500])}
    return model, inputs, ["patch_embed", "time_embed", "caption_projection", "caption_norm", "norm_out", "proj_out"]


def _wan():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2,
                                  rope_max_seq_len=32)
    inputs = {"hidden_states": torch.randn(2, 4, 2, 8, 8), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(2, 5, 12)}
    return model, inputs, ["patch_embedding", "condition_embedder", "norm_out", "proj_out"]


def _hunyuan_dit():
    from diffusers import HunyuanDiT2DModel

    model = HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
                              hidden_size=16, num_layers=4, cross_attention_dim=16, cross_attention_dim_t5=16,
                              pooled_projection_dim=8, text_len=5, text_len_t5=6,
                              use_style_cond_and_image_meta_size=False)
    inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([10.0, 500.0]),
              "encoder_hidden_states": torch.randn(2, 5, 16), "text_embedding_mask": torch.ones(2, 5),
              "encoder_hidden_states_t5": torch.randn(2, 6, 16), "text_embedding_mask_t5": torch.ones(2, 6)}
    return model, inputs, ["pos_embed", "time_extra_emb", "text_embedder", "norm_out", "proj_out"]


def _auraflow():
    from diffusers import AuraFlowTransformer2DModel

    model = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                       num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
                                       joint_attention_dim=16, caption_projection_dim=16, out_channels=4,
                                       pos_embed_max_size=16)
    inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 5, 16),
              "timestep": torch.tensor([10, 500])}
    return model, inputs, ["pos_embed", "time_step_embed", "time_step_proj", "context_embedder", "norm_out",
                           "proj_out"]


def _lumina2():
    from diffusers import Lumina2Transformer2DModel

    model = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2,
                                      num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=8,
                                      axes_dim_rope=(2, 2, 4), axes_lens=(32, 8, 8), cap_feat_dim=12)
    inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([0.1, 0.7]),
              "encoder_hidden_states": torch.randn(2, 5, 12),
              "encoder_attention_mask": torch.ones(2, 5, dtype=torch.bool)}
    return model, inputs, ["x_embedder", "time_caption_embed", "rope_embedder", "norm_out"]


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        time_embed_dim=8, text_embed_dim=12, num_layers=2, sample_width=8,
                                        sample_height=8, sample_frames=5, patch_size=2, max_text_seq_length=5)
    inputs = {"hidden_states": torch.randn(2, 2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 5, 12),
              "timestep": torch.tensor([10, 500])}
    return model, inputs, ["patch_embed", "time_embedding", "norm_final", "norm_out", "proj_out"]


def _mochi():
    """Mochi's last block is ``context_pre_only`` too, in its own attention class."""
    from diffusers import MochiTransformer3DModel

    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=8,
                                    max_sequence_length=5)
    inputs = {"hidden_states": torch.randn(2, 4, 2, 8, 8), "encoder_hidden_states": torch.randn(2, 5, 16),
              "timestep": torch.tensor([10, 500]), "encoder_attention_mask": torch.ones(2, 5, dtype=torch.bool)}
    return model, inputs, ["patch_embed", "time_embed", "rope", "norm_out", "proj_out"]


DIFFUSERS = {"unet": _unet, "unet_sdxl_text_time": lambda: _unet(sdxl=True), "sd3": _sd3,
             "sd35_dual_attention": lambda: _sd3(dual_attention=True), "flux": _flux, "pixart": _pixart, "sana": _sana,
             "hunyuan_dit": _hunyuan_dit, "auraflow": _auraflow, "lumina2": _lumina2, "cogvideox": _cogvideox,
             "mochi": _mochi, "wan": _wan}


@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_diffusers(name):
    pytest.importorskip("diffusers")
    model, inputs, never = DIFFUSERS[name]()
    exercise(model, inputs, never)


RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "dreambooth"


@pytest.mark.parametrize("kind, build", [("sdxl", lambda: _unet(sdxl=True)), ("sd3", _sd3), ("flux", _flux)])
def test_dreambooth_recipes_adapt_no_layer_that_reaches_no_output(kind, build):
    """Every layer a shipped DreamBooth recipe adapts is a default target: the hand-named ones (diffusers' own script
    defaults, SDXL and FLUX) and the family default (SD3, whose last joint block is ``context_pre_only``: a named
    ``attn.add_q_proj`` there would reach no output and train nothing)."""
    pytest.importorskip("diffusers")
    model = build()[0]
    default = set(vp.targets(model))
    for path in sorted(RECIPES.glob(f"{kind}_*.yaml")):
        named = set(vp.targets(model, yaml.safe_load(path.read_text())["adapter"]["targets"]))
        assert named and named <= default, (path.name, sorted(named - default))
    if kind == "sd3":  # the last block's context keys and values still feed the image tokens' attention; its query not
        assert {"transformer_blocks.1.attn.add_k_proj:weight", "transformer_blocks.1.attn.add_v_proj:weight"} <= default
        assert "transformer_blocks.1.attn.add_q_proj:weight" not in default


# --- transformers ------------------------------------------------------------------------------------------------
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32)


def _hf(config_name, model_name, config, inputs, never):
    import transformers

    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
    return model, inputs, never


PIXELS = {"pixel_values": torch.randn(2, 3, 32, 32)}
TOKENS = {"input_ids": torch.randint(0, 64, (2, 8))}
TRANSFORMERS = {
    "vit": lambda: _hf("ViTConfig", "ViTForImageClassification", dict(VISION, num_labels=3), PIXELS,
                       ["vit.embeddings", "classifier", "vit.pooler"]),
    "dinov2": lambda: _hf("Dinov2Config", "Dinov2Model", dict(VISION, image_size=32), PIXELS,
                          ["embeddings", "layernorm"]),
    "clip": lambda: _hf("CLIPConfig", "CLIPModel", dict(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=VISION, projection_dim=16), {**PIXELS, **TOKENS},
        ["text_model.embeddings", "vision_model.embeddings", "visual_projection", "text_projection"]),
    "convnext": lambda: _hf("ConvNextConfig", "ConvNextForImageClassification", dict(
        hidden_sizes=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_labels=3), PIXELS,
        ["convnext.embeddings", "classifier"]),
    "siglip": lambda: _hf("SiglipVisionConfig", "SiglipVisionModel", VISION, PIXELS,
                          ["vision_model.embeddings", "vision_model.head"]),
    "swin": lambda: _hf("SwinConfig", "SwinModel", dict(image_size=32, patch_size=4, embed_dim=16, depths=(1, 1),
                                                        num_heads=(1, 2), window_size=4), PIXELS,
                        ["embeddings", "pooler"]),
    "llama": lambda: _hf("LlamaConfig", "LlamaForCausalLM", TEXT, TOKENS, ["model.embed_tokens", "lm_head"]),
    "mistral": lambda: _hf("MistralConfig", "MistralForCausalLM", TEXT, TOKENS, ["model.embed_tokens", "lm_head"]),
    "gemma": lambda: _hf("GemmaConfig", "GemmaForCausalLM", dict(TEXT, head_dim=8), TOKENS,
                         ["model.embed_tokens", "lm_head"]),
    "phi": lambda: _hf("PhiConfig", "PhiForCausalLM", TEXT, TOKENS, ["model.embed_tokens", "lm_head"]),
    "qwen2": lambda: _hf("Qwen2Config", "Qwen2ForCausalLM", TEXT, TOKENS, ["model.embed_tokens", "lm_head"]),
    "qwen3": lambda: _hf("Qwen3Config", "Qwen3ForCausalLM", dict(TEXT, head_dim=8), TOKENS,
                         ["model.embed_tokens", "lm_head"]),
    "gpt2": lambda: _hf("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2,
                                                              n_head=2), TOKENS, ["transformer.wte", "lm_head"]),
    "gpt_neox": lambda: _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32), TOKENS, ["gpt_neox.embed_in", "embed_out"]),
}


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformers(name):
    pytest.importorskip("transformers")
    model, inputs, never = TRANSFORMERS[name]()
    exercise(model, inputs, never)


# --- bad input ---------------------------------------------------------------------------------------------------
class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.fc = nn.Linear(4, 2)


def test_uncovered_model_gets_a_suggestion_with_its_own_layer_names():
    model = Plain()
    with pytest.raises(ValueError, match=r"Plain.*targets=\['encoder.0', 'encoder.2', 'fc'\]"):
        vp.attach(model, "lora")
    assert not any(hasattr(m, "vp_adapters") for m in model.modules())
    with pytest.raises(ValueError, match="Plain"):
        vp.targets(model)


def test_explicit_targets_on_heads_and_embeddings_still_work():
    model = _timm_model("vit_tiny_patch16_224", TIMM[0][1])
    assert vp.targets(model, ["head", "patch_embed.proj"]) == ["patch_embed.proj:weight", "head:weight"]
    vp.attach(model, "lora", targets=["head", "patch_embed.proj"], rank=2)
    assert {n for n, m in model.named_modules() if hasattr(m, "vp_adapters")} == {"head", "patch_embed.proj"}


def test_targets_is_a_dry_run():
    model = _timm_model("vit_tiny_patch16_224", TIMM[0][1])
    before = copy.deepcopy(model.state_dict())
    listed = vp.targets(model)
    assert "blocks.0.attn.qkv:weight" in listed and not any(entry.startswith("head") for entry in listed)
    assert not any(hasattr(m, "vp_adapters") for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_cli_targets_prints_the_list_with_counts(capsys):
    from visionpeft.cli import main

    assert main(["targets", "resnet18"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "layer1.0.conv1:weight" in out and not any(line.startswith(("conv1:", "fc:")) for line in out)
    assert re.match(r"\d+ slots in \d+ layers \(\d+ Conv\)", out[-1])
    assert main(["targets", "resnet18", "--targets", "fc"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "fc:weight"
    assert main(["targets", "no_such_model_xyz"]) == 2
