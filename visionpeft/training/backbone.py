"""The classification model of a recipe: a timm backbone (or a shipped tiny one) with its adapter or baseline.

Every name or size the recipe gives is checked here, so a typo is a one-line ValueError naming the value
rather than a traceback from inside timm.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import visionpeft as vp

TINY_PREFIX = "visionpeft/tiny_"


def build_model(recipe: dict[str, Any], num_classes: int) -> nn.Module:
    """The timm backbone of the recipe, with ``pretrained`` weights or a local checkpoint.

    ``visionpeft/tiny_vit`` and ``visionpeft/tiny_convnet`` name the tiny backbones shipped with the
    package (:func:`visionpeft.models.tiny`); any other name is a timm model name.
    """
    spec = recipe["model"]
    classes = spec["num_classes"] if spec["num_classes"] is not None else num_classes
    if spec["name"].startswith(TINY_PREFIX):
        from visionpeft.models.tiny import CONFIGS, tiny

        kind = spec["name"][len(TINY_PREFIX):]
        if kind not in CONFIGS:
            raise ValueError(f"model.name={spec['name']!r} is not a shipped tiny backbone; available: "
                             f"{', '.join(TINY_PREFIX + k for k in CONFIGS)}")
        if spec["kwargs"]:
            raise ValueError(f"model.kwargs must be empty for {spec['name']!r}, got {spec['kwargs']!r}")
        model = tiny(kind, num_classes=classes, pretrained=spec["pretrained"])
    else:
        import timm

        if not timm.is_model(spec["name"]):
            raise ValueError(f"model.name={spec['name']!r} is not a timm model (timm.list_models('*vit*') lists "
                             f"them) nor a shipped tiny backbone ({TINY_PREFIX}vit, {TINY_PREFIX}convnet)")
        try:
            model = timm.create_model(spec["name"], pretrained=spec["pretrained"], num_classes=classes,
                                      **spec["kwargs"])
        except TypeError as err:  # a keyword the architecture does not take
            raise ValueError(f"model.kwargs={spec['kwargs']!r} do not fit {spec['name']!r}: {err}") from None
    if spec["checkpoint"]:
        load_checkpoint(model, spec["checkpoint"])
    check_image_size(model, spec)
    return model


@torch.no_grad()
def check_image_size(model: nn.Module, spec: dict[str, Any]) -> None:
    """One forward of a blank image of ``model.image_size`` (in eval mode, so no state changes): a size the
    model cannot take is a ValueError naming it, before any data is read."""
    size = spec["image_size"]
    training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, size, size))
    except (AssertionError, RuntimeError, ValueError) as err:
        expected = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        hint = f"; it takes {expected[1]}x{expected[2]} images" if expected else ""
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model.image_size={size} does not fit model {spec['name']!r}{hint} ({reason})") from None
    finally:
        model.train(training)


def inductor_missing(device_type: str) -> str | None:
    """Why torch.compile's default backend (inductor) cannot run on this device type, or None if it can."""
    import shutil

    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "inductor needs triton on the GPU (pip install triton)"
        return None
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "inductor needs a C++ compiler on the CPU (g++, c++ or clang++ on PATH)"
    return None


def compile_model(model: nn.Module, device_type: str) -> nn.Module:
    """``torch.compile`` of the model (inductor), or a ValueError saying why it cannot run here."""
    missing = inductor_missing(device_type)
    if missing:
        raise ValueError(f"train.compile=true: {missing}; use train.compile=false")
    return torch.compile(model)


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Weights from a local file: ``.npz`` (original ViT), ``.safetensors``, or a torch file of tensors."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model.checkpoint {path!r} does not exist")
    if file.suffix == ".npz":
        import timm

        timm.models.load_checkpoint(model, str(file), strict=False)
        return
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"model.checkpoint {path!r} has no tensor that fits {type(model).__name__}")
    model.load_state_dict(usable, strict=False)


def head_name(model: nn.Module) -> str:
    getter = getattr(model, "get_classifier", None)
    if getter is not None:
        head = getter()
        for name, module in model.named_modules():
            if module is head and name:
                return name
    return "head"


def apply_adapter(model: nn.Module, adapter: dict[str, Any]) -> nn.Module:
    method = adapter["method"]
    unfreeze = [head_name(model) if u == "head" else u for u in adapter["unfreeze"]]
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method in ("linear", "peft-lora"):
        for p in model.parameters():
            p.requires_grad_(False)
        if method == "peft-lora":
            model = attach_peft_lora(model, adapter)
        modules = dict(model.named_modules())
        for name in unfreeze:
            modules[name].requires_grad_(True)
        return model
    return vp.attach(model, method, targets=adapter["targets"], unfreeze=unfreeze, **adapter["options"])


def attach_peft_lora(model: nn.Module, adapter: dict[str, Any]) -> nn.Module:
    """Hugging Face PEFT's LoRA as an outside peer, on exactly the layers visionpeft's LoRA would adapt
    (``adapter.targets`` resolved by visionpeft, family preset included); with ``options.use_dora``, PEFT's DoRA
    (LoRA's factors and a trained magnitude per output channel) on those layers."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("adapter.method='peft-lora' needs Hugging Face PEFT: pip install peft") from None
    from visionpeft.targeting import resolve_targets

    options = {"rank": 8, "alpha": None, "dropout": 0.0, "use_dora": False} | adapter["options"]
    label = "peft-dora" if options["use_dora"] else "peft-lora"
    targets = resolve_targets(model, adapter["targets"])
    # PEFT adapts a grouped conv only when the rank is divisible by its groups (depthwise convs never, at small
    # ranks); those layers stay frozen in this baseline, and the run says so
    unsupported = [t.name for t in targets if getattr(t.module, "groups", 1) > 1 and options["rank"] % t.module.groups]
    if unsupported:
        warnings.warn(f"{label}: PEFT cannot adapt {len(unsupported)} grouped conv(s) at rank {options['rank']} "
                      f"(e.g. {unsupported[0]!r}); they stay frozen in this baseline")
    names = [t.name for t in targets if t.name not in unsupported]
    config = LoraConfig(r=options["rank"], lora_alpha=options["alpha"] or options["rank"],
                        lora_dropout=options["dropout"], target_modules=names, use_dora=bool(options["use_dora"]))
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)  # lora_A, lora_B and DoRA's lora_magnitude_vector
    return model


def param_groups(model: nn.Module, weight_decay: float, rules: list[str], exclude=()) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay for parameters matching a rule (a name fragment, or "1d" for ≤1-D); the
    parameters whose ids are in ``exclude`` are left out (another optimizer trains them)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in exclude:
            continue
        skip = any((rule == "1d" and param.ndim <= 1) or (rule != "1d" and rule in name) for rule in rules)
        (no_decay if skip else decay).append(param)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]
