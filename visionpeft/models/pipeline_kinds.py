"""What visionpeft knows about each supported diffusers pipeline, in one place: its denoiser, its text encoders,
which components its LoRA loader reads, its training objective and its kohya-ss key prefixes.

=========================  ===========  =========================================  ===========  ============
pipeline                   denoiser     text encoders (adapted by default first)   objective    kohya keys
=========================  ===========  =========================================  ===========  ============
StableDiffusionPipeline    unet         text_encoder (CLIP)                        ε / v        lora_unet_, lora_te_
StableDiffusionXLPipeline  unet         text_encoder, text_encoder_2 (CLIP L, G)   ε / v        lora_unet_, lora_te1_, lora_te2_
StableDiffusion3Pipeline   transformer  text_encoder, text_encoder_2 (CLIP), T5    flow         —
FluxPipeline               transformer  text_encoder (CLIP), text_encoder_2 (T5)   flow         —
=========================  ===========  =========================================  ===========  ============

The LoRA components are those the pipeline's ``load_lora_weights`` reads (diffusers' ``_lora_loadable_modules``):
the denoiser and the CLIP encoders, never a T5.
"""
from __future__ import annotations

import dataclasses

OBJECTIVES = ("diffusion", "flow")


@dataclasses.dataclass(frozen=True)
class PipelineKind:
    name: str
    pipeline_class: str
    denoiser: str
    text_encoders: tuple[str, ...]
    #: the text encoders a ``text_encoder`` adapter goes on when the recipe names none (diffusers' scripts' choice)
    default_text_encoders: tuple[str, ...]
    #: the components ``load_lora_weights`` reads, in the order of their key prefixes
    lora_components: tuple[str, ...]
    #: "diffusion": DDPM noising with an ε or v target; "flow": rectified flow, target noise − latents
    objective: str
    #: component → kohya-ss key prefix (empty: the pipeline has no kohya LoRA layout that diffusers module names fit)
    kohya_prefixes: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def components(self) -> tuple[str, ...]:
        return (self.denoiser, *self.text_encoders)


KINDS = {kind.pipeline_class: kind for kind in (
    PipelineKind("sd", "StableDiffusionPipeline", "unet", ("text_encoder",), ("text_encoder",),
                 ("unet", "text_encoder"), "diffusion", {"unet": "lora_unet_", "text_encoder": "lora_te_"}),
    PipelineKind("sdxl", "StableDiffusionXLPipeline", "unet", ("text_encoder", "text_encoder_2"),
                 ("text_encoder", "text_encoder_2"), ("unet", "text_encoder", "text_encoder_2"), "diffusion",
                 {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}),
    PipelineKind("sd3", "StableDiffusion3Pipeline", "transformer", ("text_encoder", "text_encoder_2", "text_encoder_3"),
                 ("text_encoder", "text_encoder_2"), ("transformer", "text_encoder", "text_encoder_2"), "flow"),
    PipelineKind("flux", "FluxPipeline", "transformer", ("text_encoder", "text_encoder_2"), ("text_encoder",),
                 ("transformer", "text_encoder"), "flow"),
)}
SUPPORTED = tuple(KINDS)


def kind_of(pipeline_or_class) -> PipelineKind:
    """The kind of a pipeline (an instance, a class, or a class name); ValueError listing the supported ones."""
    if isinstance(pipeline_or_class, str):
        name = pipeline_or_class
    else:
        name = (pipeline_or_class if isinstance(pipeline_or_class, type) else type(pipeline_or_class)).__name__
    if name not in KINDS:
        raise ValueError(f"pipeline class {name!r} is not supported; supported: {', '.join(SUPPORTED)}")
    return KINDS[name]


def denoiser(pipeline):
    """The pipeline's UNet or transformer."""
    return getattr(pipeline, kind_of(pipeline).denoiser)


def text_encoders(pipeline) -> dict[str, object]:
    """component name → text encoder, for those the pipeline holds (SD3 may be loaded without its T5)."""
    return {name: getattr(pipeline, name) for name in kind_of(pipeline).text_encoders
            if getattr(pipeline, name, None) is not None}
