"""visionpeft LoRA and DoRA ⇄ the LoRA files of the diffusers ecosystem.

Export writes what ``StableDiffusionPipeline.load_lora_weights`` reads: keys
``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (and ``text_encoder.<module>...``). That format carries no
alpha (diffusers then uses alpha = rank, a scale of 1), so visionpeft's scale (alpha/rank, or alpha/√rank
with rslora) is folded into ``lora_B``: the product B·A, which is all a LoRA is, is unchanged. ``fmt="kohya"``
writes ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up.weight`` / ``alpha`` (scale = alpha/rank)
for tools that expect kohya-ss files.

DoRA is a LoRA plus one magnitude per output channel: diffusers files carry it as PEFT does,
``<component>.<module>.lora_magnitude_vector.weight`` ((out,) for a linear layer, (1, out, 1, 1) for a conv), which
``load_lora_weights`` reads into PEFT's DoRA (the same function as visionpeft's); kohya files as LyCORIS's
``dora_scale`` (out, 1[, 1, 1]), the per-output-channel norm. diffusers' Stable Diffusion loader drops
``dora_scale`` keys, so for diffusers write ``fmt="diffusers"``.

Import reads diffusers (PEFT-style ``lora_A``/``lora_B``, older ``lora.down``/``lora.up``, attention-processor
``to_q_lora``) and kohya (``lora_unet_…``/``lora_te_…`` with ``alpha``) files, and attaches visionpeft LoRA
with those factors. On a convolution, the down factor is a conv with the base kernel (rank, in, kh, kw) and the
up factor a 1×1 conv (out, rank, 1, 1), which is visionpeft's LoRA on a conv (A: rank × in·kh·kw, B: out × rank).
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

FORMATS = ("diffusers", "kohya")
COMPONENTS = ("unet", "text_encoder")
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


def to_state_dict(components: dict[str, dict[str, LoraFactors]], fmt: str = "diffusers") -> dict[str, torch.Tensor]:
    """``{component: {module: factors}}`` → the tensors of a LoRA file in ``fmt``."""
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
                stem = _KOHYA_PREFIX[component] + module.replace(".", "_")
                state[f"{stem}.lora_down.weight"] = down
                state[f"{stem}.lora_up.weight"] = up
                state[f"{stem}.alpha"] = torch.tensor(f.scale * f.rank, dtype=torch.float32)
                if f.magnitude is not None:  # LyCORIS's norm on the output axis: (out, 1[, 1, 1])
                    state[f"{stem}.dora_scale"] = f.magnitude.float().reshape(-1, 1, *spatial).contiguous()
    return state


def export_lora(path: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None, *,
                adapter: str = "default", fmt: str = "diffusers") -> Path:
    """Write the LoRA adapter ``adapter`` of ``unet`` (and of ``text_encoder``, if given and adapted) to the
    ``.safetensors`` file ``path``, atomically. ``pipeline.load_lora_weights(path)`` then reproduces it."""
    from visionpeft.core import records

    check_lora_target(path, fmt)
    components = {"unet": lora_factors(unet, adapter)}
    if text_encoder is not None and adapter in records(text_encoder):
        components["text_encoder"] = lora_factors(text_encoder, adapter)
    return write_lora_file(path, to_state_dict(components, fmt))


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


# --- import -------------------------------------------------------------------------------------
_DIFFUSERS_KEY = re.compile(
    r"(?:(?P<component>unet|text_encoder)\.)?(?:base_model\.model\.)?(?P<module>.+?)"
    r"\.(?:(?P<peft>lora_[AB])(?:\.[A-Za-z_]\w*)?\.weight"
    r"|lora(?:_linear_layer)?\.(?P<old>down|up)\.weight|(?P<alpha>alpha)"
    r"|(?P<magnitude>lora_magnitude_vector)(?:\.[A-Za-z_]\w*)?(?:\.weight)?)")
_KOHYA_KEY = re.compile(
    r"lora_(?P<component>unet|te1?)_(?P<module>\w+?)\.(?:(?P<part>lora_down|lora_up)\.weight|(?P<alpha>alpha)"
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
        component = "unet" if kohya["component"] == "unet" else "text_encoder"
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


def import_lora(source: str | os.PathLike | dict[str, torch.Tensor], unet: nn.Module,
                text_encoder: nn.Module | None = None, *, name: str = "default") -> dict[str, list[str]]:
    """Attach visionpeft LoRA to ``unet`` (and ``text_encoder``) with the factors of a diffusers or kohya LoRA
    file (or its tensors); DoRA where the file has magnitudes. Layers of equal method, rank and scale share one
    adapter: ``name``, then ``name_1``, ... when a file mixes them. All or nothing: every group is checked before a model changes, and should attaching still
    fail, the adapters attached by this call are removed again. Returns ``{component: [adapter names]}``."""
    from visionpeft.core import adapters_rolled_back_on_error

    if isinstance(source, dict):
        state, metadata = source, {}
    else:
        state, metadata = read_lora_file(source)
    if not state:
        raise ValueError("the LoRA file holds no tensors")
    models = {"unet": unet} | ({"text_encoder": text_encoder} if text_encoder is not None else {})
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
