"""Import of LoRA files into visionpeft: diffusers (PEFT-style ``lora_A``/``lora_B``, older ``lora.down``/``lora.up``,
attention-processor ``to_q_lora``) and kohya (``lora_unet_…``, ``lora_te_…`` / ``lora_te1_…`` / ``lora_te2_…`` with
``alpha``) files, for every component of the supported pipelines: ``unet``, ``transformer``, ``text_encoder``,
``text_encoder_2``, ``text_encoder_3`` (what diffusers' DreamBooth scripts save for SD, SDXL, SD3 and FLUX).

Each layer gets visionpeft LoRA (DoRA where the file has magnitudes) with the file's factors. On a convolution, the
down factor is a conv with the base kernel (rank, in, kh, kw) and the up factor a 1×1 conv (out, rank, 1, 1), which
is visionpeft's LoRA on a conv (A: rank × in·kh·kw, B: out × rank).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionpeft.interop.diffusers_lora import METADATA_KEY, LoraFactors, component_name

_KOHYA_COMPONENT = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}

_DIFFUSERS_KEY = re.compile(
    r"(?:(?P<component>unet|transformer|text_encoder(?:_2|_3)?)\.)?(?:base_model\.model\.)?(?P<module>.+?)"
    r"\.(?:(?P<peft>lora_[AB])(?:\.[A-Za-z_]\w*)?\.weight"
    r"|lora(?:_linear_layer)?\.(?P<old>down|up)\.weight|(?P<alpha>alpha)"
    r"|(?P<magnitude>lora_magnitude_vector)(?:\.[A-Za-z_]\w*)?(?:\.weight)?)")
_KOHYA_KEY = re.compile(
    r"lora_(?P<component>unet|te[12]?)_(?P<module>\w+?)\.(?:(?P<part>lora_down|lora_up)\.weight|(?P<alpha>alpha)"
    r"|(?P<magnitude>dora_scale))")
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.")


@dataclasses.dataclass
class _Entry:
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    magnitude: torch.Tensor | None = None


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a ``.safetensors`` LoRA file and its diffusers adapter metadata (``{}`` when absent)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}
            raw = (fh.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(path)!r} is not a readable .safetensors file: {err}") from None
    try:
        metadata = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        metadata = {}
    return state, metadata


def _module_index(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    modules = {n: m for n, m in model.named_modules() if n}
    return modules, {n.replace(".", "_"): n for n in modules}


def parse_state_dict(state: dict[str, torch.Tensor], models: dict[str, nn.Module],
                     metadata: dict[str, Any] | None = None) -> dict[str, dict[str, LoraFactors]]:
    """``{component: {module: LoraFactors}}`` from the tensors of a diffusers or kohya LoRA file; every key must
    be understood and every module must exist in ``models`` (``{"unet": unet, "text_encoder": te}``)."""
    indexes = {c: _module_index(m) for c, m in models.items()}
    entries: dict[tuple[str, str], _Entry] = defaultdict(_Entry)
    for key, value in state.items():
        component, module, part = _classify(key, indexes)
        entry = entries[(component, module)]
        if part == "alpha":
            entry.alpha = float(value.float().item())
        else:
            setattr(entry, part, value)
    found: dict[str, dict[str, LoraFactors]] = defaultdict(dict)
    for (component, module), entry in entries.items():
        if entry.down is None or entry.up is None:
            raise ValueError(f"LoRA file: {component} module {module!r} has no "
                             f"{'down (lora_A)' if entry.down is None else 'up (lora_B)'} factor")
        rank = entry.down.shape[0]
        alpha, rslora = _alpha(metadata or {}, component, module, rank, entry.alpha)
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        magnitude = None if entry.magnitude is None else entry.magnitude.reshape(-1)
        found[component][module] = LoraFactors(entry.down, entry.up, scale, magnitude)
    return dict(found)


def _classify(key: str, indexes: dict[str, tuple[dict, dict]]) -> tuple[str, str, str]:
    kohya = _KOHYA_KEY.fullmatch(key)
    if kohya:
        component = _KOHYA_COMPONENT[kohya["component"]]
        if component not in indexes:
            raise ValueError(f"LoRA file key {key!r} is for the {component}, which was not given")
        module = indexes[component][1].get(kohya["module"])
        if module is None:
            raise ValueError(f"LoRA file key {key!r}: the {component} has no module {kohya['module']!r} "
                             f"(kohya names are module names with '.' written as '_')")
        if kohya["alpha"] or kohya["magnitude"]:
            return component, module, "alpha" if kohya["alpha"] else "magnitude"
        return component, module, "down" if kohya["part"] == "lora_down" else "up"
    normalized = _PROCESSOR.sub(lambda m: f".{m[1]}{'.0' if m[1] == 'to_out' else ''}.lora.", key)
    match = _DIFFUSERS_KEY.fullmatch(normalized)
    if not match:
        raise ValueError(f"LoRA file key {key!r} is in no format this reader knows (diffusers '<component>.<module>."
                         f"lora_A.weight', '...lora.down.weight', or kohya 'lora_unet_<module>.lora_down.weight')")
    module = match["module"]
    if match["component"] and match["component"] not in indexes:
        raise ValueError(f"LoRA file key {key!r} is for the {match['component']}, which was not given")
    component = match["component"] or next((c for c in indexes if module in indexes[c][0]), None)
    if component is None:
        raise ValueError(f"LoRA file key {key!r}: module {module!r} is in none of the given models "
                         f"({', '.join(indexes)})")
    if module not in indexes[component][0]:
        raise ValueError(f"LoRA file key {key!r}: the {component} has no module {module!r}")
    if match["alpha"] or match["magnitude"]:
        return component, module, "alpha" if match["alpha"] else "magnitude"
    return component, module, "down" if match["peft"] == "lora_A" or match["old"] == "down" else "up"


def _alpha(metadata: dict[str, Any], component: str, module: str, rank: int, stored: float | None) -> tuple[float, bool]:
    """alpha of one module: a stored ``alpha`` tensor (0 means rank, as in kohya-ss), else the diffusers metadata,
    else rank (scale 1)."""
    if stored is not None:
        return (float(rank) if stored == 0 else stored), False
    config = metadata.get(component) if isinstance(metadata.get(component), dict) else {
        k[len(component) + 1:]: v for k, v in metadata.items() if k.startswith(component + ".")}
    if not config:
        return float(rank), False
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        bare = pattern.lstrip("^")
        if module == bare or module.endswith("." + bare):
            alpha = value
    return float(alpha), bool(config.get("use_rslora", False))


def import_lora(source: str | os.PathLike | dict[str, torch.Tensor], model, text_encoder: nn.Module | None = None,
                *, name: str = "default", component: str | None = None) -> dict[str, list[str]]:
    """Attach visionpeft LoRA to the components of a supported pipeline ``model`` (or to one component, a UNet or a
    transformer, with SD's ``text_encoder`` beside it) with the factors of a diffusers or kohya LoRA file (or its
    tensors); DoRA where the file has magnitudes. Layers of equal method, rank and scale share one
    adapter: ``name``, then ``name_1``, ... when a file mixes them. All or nothing: every group is checked before a model changes, and should attaching still
    fail, the adapters attached by this call are removed again. Returns ``{component: [adapter names]}``."""
    from visionpeft.core import adapters_rolled_back_on_error

    if isinstance(source, dict):
        state, metadata = source, {}
    else:
        state, metadata = read_lora_file(source)
    if not state:
        raise ValueError("the LoRA file holds no tensors")
    models = import_targets(model, text_encoder, component)
    parsed = parse_state_dict(state, models, metadata)
    plans = {component: _group(models[component], layers, component) for component, layers in parsed.items()}
    for component, groups in plans.items():
        _check_groups(models[component], component, groups, name)
    attached = {}
    with adapters_rolled_back_on_error(*models.values()):
        for component, groups in plans.items():
            attached[component] = [_attach_group(models[component], group, _group_name(name, i))
                                   for i, group in enumerate(groups)]
    return attached


def _group_name(name: str, index: int) -> str:
    return name if index == 0 else f"{name}_{index}"


def _check_groups(model: nn.Module, component: str, groups: list[dict[str, LoraFactors]], name: str) -> None:
    """Everything attaching the groups checks, done before the first attach: free names, LoRA options, targets."""
    from visionpeft.core import records
    from visionpeft.methods.base import get_method, resolve_options
    from visionpeft.targeting import resolve_targets

    names = [_group_name(name, i) for i in range(len(groups))]
    taken = [n for n in names if n in records(model)]
    if taken:
        raise ValueError(f"the {component} already has adapter(s) {taken}; pass another name=")
    for group_name, group in zip(names, groups):
        first = next(iter(group.values()))
        try:
            resolve_options(get_method(_method(first)), {"rank": first.rank, "alpha": first.scale * first.rank})
            resolve_targets(model, list(group))
        except ValueError as err:
            raise ValueError(f"LoRA file: {component} layers {list(group)[:3]} (rank {first.rank}, scale "
                             f"{first.scale:g}, adapter {group_name!r}): {err}") from None


def _group(model: nn.Module, layers: dict[str, LoraFactors], component: str) -> list[dict[str, LoraFactors]]:
    from visionpeft.layers.adapted import layer_kind

    modules = dict(model.named_modules())
    groups: dict[tuple[str, int, float], dict[str, LoraFactors]] = {}
    for module_name, factors in layers.items():
        module = modules[module_name]
        kind = layer_kind(module)
        has_weight = kind is not None and "weight" in kind.slot_names(module)
        slot = kind.slot(module, "weight", module_name) if has_weight else None
        if slot is None or slot.op not in ("linear", "conv") or slot.groups != 1:
            raise ValueError(f"{component} module {module_name!r} ({type(module).__name__}) cannot carry a LoRA: "
                             f"only Linear and ungrouped Conv layers can")
        _check_shapes(component, module_name, slot, factors)
        groups.setdefault((_method(factors), factors.rank, factors.scale), {})[module_name] = factors
    return list(groups.values())


def _check_shapes(component: str, module: str, slot, f: LoraFactors) -> None:
    rank, out = f.rank, slot.shape[0]
    kernel = tuple(slot.shape[2:])
    down_kernel = tuple(f.down.shape[2:])
    ok = f.down.numel() == rank * slot.in_features and f.up.numel() == out * rank and f.up.shape[0] == out \
        and (not kernel or down_kernel in (kernel, ()) or math.prod(down_kernel) == math.prod(kernel) == 1)
    if f.magnitude is not None and f.magnitude.numel() != out:
        raise ValueError(f"{component} module {module!r}: DoRA magnitude of shape {tuple(f.magnitude.shape)} does not "
                         f"fit its {out} output channels")
    if not ok:
        fan_in = ", ".join(map(str, slot.shape[1:]))
        raise ValueError(f"{component} module {module!r}: LoRA factors down {tuple(f.down.shape)}, up {tuple(f.up.shape)} "
                         f"do not fit its weight {tuple(slot.shape)} (want down (rank, {fan_in}) "
                         f"and up ({out}, rank{', 1' * len(kernel)}))")


@torch.no_grad()
def _attach_group(model: nn.Module, group: dict[str, LoraFactors], name: str) -> str:
    import visionpeft as vp

    first = next(iter(group.values()))
    vp.attach(model, _method(first), targets=list(group), name=name, rank=first.rank, alpha=first.scale * first.rank)
    modules = dict(model.named_modules())
    for module_name, f in group.items():
        method = modules[module_name].vp_adapters[name]["weight"]
        method.set_factors(f.down, f.up, f.scale)
        if f.magnitude is not None:
            method.set_magnitude(f.magnitude)
    return name


def _method(factors: LoraFactors) -> str:
    return "lora" if factors.magnitude is None else "dora"


def import_targets(model, text_encoder=None, component: str | None = None) -> dict[str, nn.Module]:
    """{component: model} a file's keys are matched against: every component of a supported pipeline, or one bare
    component (and SD's ``text_encoder``)."""
    from visionpeft.models.pipeline_kinds import KINDS, kind_of

    if type(model).__name__ in KINDS:
        if text_encoder is not None or component is not None:
            raise ValueError("text_encoder= and component= are for a bare component; a pipeline imports into its own "
                             "components")
        return {name: getattr(model, name) for name in kind_of(model).components
                if getattr(model, name, None) is not None}
    return {component_name(model, component): model} | ({"text_encoder": text_encoder} if text_encoder else {})
