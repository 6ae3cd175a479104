"""visionpeft LoRA and DoRA ⇄ the LoRA files of the diffusers ecosystem (export here; import in
``visionpeft.interop.lora_import``).

Export writes what each pipeline's ``load_lora_weights`` reads: keys ``<component>.<module>.lora_A.weight`` /
``lora_B.weight`` for the components its loader accepts (``visionpeft.models.pipeline_kinds``): ``unet.`` and
``text_encoder.`` for SD-1.x; ``unet.``, ``text_encoder.``, ``text_encoder_2.`` for SDXL; ``transformer.``,
``text_encoder.``, ``text_encoder_2.`` for SD3; ``transformer.`` and ``text_encoder.`` for FLUX (no loader reads a T5
adapter, so one is refused by name). The same file loads into a bare component with
``component.load_lora_adapter(path, prefix=<component>)``. That format carries no
alpha (diffusers then uses alpha = rank, a scale of 1), so visionpeft's scale (alpha/rank, or alpha/√rank
with rslora) is folded into ``lora_B``: the product B·A, which is all a LoRA is, is unchanged. ``fmt="kohya"``
writes ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up.weight`` / ``alpha`` (scale = alpha/rank)
for tools that expect kohya-ss files: SD-1.x's text encoder as ``lora_te_``, SDXL's two as ``lora_te1_`` and
``lora_te2_``. kohya's SD3 and FLUX files name the original (BFL, SAI) modules, not diffusers', so those pipelines
export in diffusers' format only.

DoRA is a LoRA plus one magnitude per output channel: diffusers files carry it as PEFT does,
``<component>.<module>.lora_magnitude_vector.weight`` ((out,) for a linear layer, (1, out, 1, 1) for a conv), which
``load_lora_weights`` reads into PEFT's DoRA (the same function as visionpeft's); kohya files as LyCORIS's
``dora_scale`` (out, 1[, 1, 1]), the per-output-channel norm. diffusers' Stable Diffusion loader drops
``dora_scale`` keys, so for diffusers write ``fmt="diffusers"``.

Diffusers files import back with ``visionpeft.interop.lora_import.import_lora``.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

FORMATS = ("diffusers", "kohya")
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
METADATA_KEY = "lora_adapter_metadata"


@dataclasses.dataclass
class LoraFactors:
    """One layer's update ΔW = scale · up · down, in the diffusers layout (convs: down kxk, up 1×1)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    #: DoRA's magnitude, one value per output channel (None: a plain LoRA)
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


# --- export -------------------------------------------------------------------------------------
def lora_factors(model: nn.Module, adapter: str = "default") -> dict[str, LoraFactors]:
    """Per adapted layer of ``model``, the factors of visionpeft LoRA or DoRA adapter ``adapter``. Raises ValueError for what
    a diffusers LoRA file cannot hold: another method, modules or biases trained fully (``unfreeze``), layers
    other than Linear and ungrouped Conv, and convs whose dilation or padding mode diffusers' LoRA does not copy."""
    from visionpeft.core import adapted_layers, records
    from visionpeft.layers.adapted import layer_kind

    record = records(model).get(adapter)
    if record is None:
        raise ValueError(f"{type(model).__name__} has no adapter named {adapter!r}; attached: "
                         f"{', '.join(records(model)) or '(none)'}")
    if record.method not in ("lora", "dora"):
        raise ValueError(f"adapter {adapter!r} is {record.method!r}; only 'lora' and 'dora' export as LoRA factors. "
                         f"{_OTHER_WAYS}")
    trained_fully = list(record.unfreeze) + list(record.unfreeze_parameters)
    if trained_fully:
        raise ValueError(f"adapter {adapter!r} also trains {trained_fully[:5]} fully (unfreeze), which a LoRA file "
                         f"cannot hold. {_OTHER_WAYS}")
    factors, unsupported = {}, []
    for name, layer in adapted_layers(model):
        for slot_name, method in layer.vp_adapters[adapter].items() if adapter in layer.vp_adapters else ():
            slot = layer_kind(layer).slot(layer, slot_name, name)
            problem = _export_problem(slot_name, slot, method)
            if problem:
                unsupported.append(f"{name}:{slot_name} ({type(layer).__name__}: {problem})")
                continue
            down, up, scale = method.factors()
            spatial = (1,) * (len(slot.shape) - 2)
            magnitude = method.magnitude.detach() if record.method == "dora" else None
            factors[name] = LoraFactors(down=down.reshape(method.rank, *slot.shape[1:]),
                                        up=up.reshape(slot.shape[0], method.rank, *spatial), scale=scale,
                                        magnitude=magnitude)
    if unsupported:
        raise ValueError(f"adapter {adapter!r} has layers with no diffusers LoRA equivalent: "
                         f"{', '.join(unsupported[:5])}"
                         f"{f' and {len(unsupported) - 5} more' if len(unsupported) > 5 else ''}; only Linear and "
                         f"ungrouped Conv weights with dilation 1 and padding_mode 'zeros' export. {_OTHER_WAYS}")
    return factors


_OTHER_WAYS = ("Use visionpeft.interop.save_merged (the merged model) or visionpeft.interop.export_lora_approximation "
               "(a LoRA fitted by vp.extract) instead")


def _export_problem(slot_name: str, slot, method) -> str | None:
    """Why one adapted slot cannot be written as a diffusers LoRA layer (None: it can)."""
    if slot_name != "weight" or not hasattr(method, "factors"):
        return f"slot {slot_name!r}"
    if slot.op not in ("linear", "conv"):
        return f"op {slot.op!r}"
    if slot.op == "conv" and slot.groups != 1:
        return f"groups={slot.groups}"
    if slot.op == "conv" and any(d != 1 for d in slot.dilation):
        return f"dilation={tuple(slot.dilation)}"
    if slot.op == "conv" and slot.padding_mode != "zeros":
        return f"padding_mode={slot.padding_mode!r}"
    return None


def to_state_dict(components: dict[str, dict[str, LoraFactors]], fmt: str = "diffusers",
                  kohya_prefixes: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """``{component: {module: factors}}`` → the tensors of a LoRA file in ``fmt`` (kohya: with ``kohya_prefixes``,
    component → key prefix; SD-1.x's by default)."""
    prefixes = _KOHYA_PREFIX if kohya_prefixes is None else kohya_prefixes
    if fmt == "kohya" and set(components) - set(prefixes):
        raise ValueError(f"fmt='kohya' has no key prefix for {sorted(set(components) - set(prefixes))}; kohya keys exist "
                         f"for {', '.join(prefixes) or 'no component of this pipeline'} (use fmt='diffusers')")
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
    state = {}
    for component, layers in components.items():
        for module, f in layers.items():
            down, up = f.down.float().contiguous(), f.up.float().contiguous()
            spatial = (1,) * (down.dim() - 2)
            if fmt == "diffusers":
                state[f"{component}.{module}.lora_A.weight"] = down
                state[f"{component}.{module}.lora_B.weight"] = (up * f.scale).contiguous()
                if f.magnitude is not None:  # PEFT's shapes: (out,), or (1, out, 1, 1) on a conv
                    shape = (1, -1, *spatial) if spatial else (-1,)
                    state[f"{component}.{module}.lora_magnitude_vector.weight"] = f.magnitude.float().reshape(shape).contiguous()
            else:
                stem = prefixes[component] + module.replace(".", "_")
                state[f"{stem}.lora_down.weight"] = down
                state[f"{stem}.lora_up.weight"] = up
                state[f"{stem}.alpha"] = torch.tensor(f.scale * f.rank, dtype=torch.float32)
                if f.magnitude is not None:  # LyCORIS's norm on the output axis: (out, 1[, 1, 1])
                    state[f"{stem}.dora_scale"] = f.magnitude.float().reshape(-1, 1, *spatial).contiguous()
    return state


def export_lora(path: str | os.PathLike, model, text_encoder: nn.Module | None = None, *, adapter: str = "default",
                fmt: str = "diffusers", component: str | None = None) -> Path:
    """Write the LoRA adapter ``adapter`` to the ``.safetensors`` file ``path``, atomically.

    ``model``: a supported pipeline (every component its ``load_lora_weights`` reads that carries ``adapter``), or
    one component (a UNet or a transformer; ``component`` names it when its class does not) with SD's
    ``text_encoder`` beside it. ``pipeline.load_lora_weights(path)`` then reproduces the adapters, and
    ``component.load_lora_adapter(path, prefix=<component>)`` the one of a bare component."""
    check_lora_target(path, fmt)
    models, kind = export_components(model, text_encoder, adapter, component)
    prefixes = None if kind is None else kind.kohya_prefixes
    if fmt == "kohya" and kind is not None and not prefixes:
        raise ValueError(f"fmt='kohya' is not available for a {kind.pipeline_class}: kohya's files for it name the "
                         f"original modules, not diffusers'; allowed: fmt='diffusers'")
    if fmt == "kohya" and kind is None and "transformer" in models:
        raise ValueError("fmt='kohya' is for UNet pipelines (SD-1.x, SDXL); a transformer exports with fmt='diffusers'")
    components = {name: lora_factors(m, adapter) for name, m in models.items()}
    return write_lora_file(path, to_state_dict(components, fmt, prefixes))


def component_name(model: nn.Module, component: str | None = None) -> str:
    """The file prefix of a bare denoiser: ``component``, else ``transformer`` for a transformer class, ``unet``."""
    if component is not None:
        if component not in COMPONENTS:
            raise ValueError(f"component={component!r} is unknown; allowed: {', '.join(COMPONENTS)}")
        return component
    return "transformer" if "Transformer" in type(model).__name__ else "unet"


def export_components(model, text_encoder, adapter: str, component: str | None = None):
    """({component: model} to export, the pipeline kind or None for a bare component). A pipeline's adapted
    component that its loader cannot read (a T5) is refused by name."""
    from visionpeft.core import records
    from visionpeft.models.pipeline_kinds import KINDS, kind_of

    if type(model).__name__ not in KINDS:
        models = {component_name(model, component): model}
        if text_encoder is not None and adapter in records(text_encoder):
            models["text_encoder"] = text_encoder
        return models, None
    if text_encoder is not None or component is not None:
        raise ValueError("text_encoder= and component= are for a bare component; a pipeline exports its own components")
    kind = kind_of(model)
    adapted = {name: getattr(model, name) for name in kind.components
               if getattr(model, name, None) is not None and adapter in records(getattr(model, name))}
    unreadable = [name for name in adapted if name not in kind.lora_components]
    if unreadable:
        raise ValueError(f"{unreadable[0]} carries adapter {adapter!r}, but {kind.pipeline_class}.load_lora_weights reads "
                         f"only {', '.join(kind.lora_components)}; save it with vp.save (or the pipeline adapter "
                         f"folder) instead")
    if not adapted:
        raise ValueError(f"no component of this {kind.pipeline_class} carries adapter {adapter!r}")
    return adapted, kind


def check_lora_target(path: str | os.PathLike, fmt: str = "diffusers") -> Path:
    """``path`` as a Path, after checking the format name and the ``.safetensors`` suffix."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA file {str(path)!r} must end in .safetensors (what diffusers and kohya tools read)")
    return path


def write_lora_file(path: str | os.PathLike, state: dict[str, torch.Tensor]) -> Path:
    """The tensors ``state`` as a ``.safetensors`` file, written atomically."""
    from safetensors.torch import save_file

    from visionpeft.io import atomic_write

    path = check_lora_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


