"""timm, every architecture, from the model's own metadata.

``pretrained_cfg["first_conv"]`` names the stem's first conv and ``pretrained_cfg["classifier"]`` the classifier;
``feature_info`` lists the modules whose outputs are the model's feature maps (its stages or blocks). Walking the
top-level children in order (the order timm runs them in):

- the stem is the child holding ``first_conv`` and every child before the first feature module (a ResNet's
  ``conv1`` .. ``maxpool``, a ViT's ``patch_embed``, a hybrid ViT's CNN patch embedding as a whole);
- the trunk runs from there to the child holding the last feature module, and on through further lists of
  blocks (XCiT's class-attention blocks);
- the rest is the head: the classifier's own container with its pre-logits, an attention-pool head (SigLIP's
  ``attn_pool``), a 1×1 conv after the last stage (EfficientNet's and MobileNetV3's ``conv_head``, FastViT's
  ``final_conv``).

When one child holds both the stem and the last feature module (DenseNet's ``features``), the same walk runs
inside it. Without ``feature_info`` the trunk ends before the classifier's child.

Position encodings inside the trunk are never targets either, found two ways: the model's own
``no_weight_decay()`` lists the parameters timm keeps out of weight decay, which are its position tables and the
layers that compute them (MaxViT's and GC ViT's ``rel_pos.mlp``, Twins' PEG ``pos_block``); and a module whose
qualified name has a position word in it (:data:`POSITION_WORDS`: EdgeNeXt's ``pos_embd``, DaViT's ``cpe``, CoaT's
``crpe``), for the models that do not list theirs.
"""
from __future__ import annotations

import fnmatch
import re

from torch import nn

from visionpeft.families.base import Rule, from_library


def _names(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]


def _feature_modules(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    if hasattr(info, "module_name"):  # a FeatureInfo object (features_only models)
        names = list(info.module_name())
    else:
        names = [entry.get("module", "") for entry in info if isinstance(entry, dict)]
    return [n for n in names if n in modules]


def _child_index(children: list[str], prefix: str, name: str) -> int | None:
    for i, child in enumerate(children):
        qualified = f"{prefix}{child}"
        if name == qualified or name.startswith(qualified + "."):
            return i
    return None


_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_block_list(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0 and \
        any(isinstance(m, _LAYERS) for m in module.modules())


def _trunk_in(container: nn.Module, prefix: str, stems: list[str], heads: list[str], features: list[str]) -> list[str]:
    names = [n for n, _ in container.named_children()]
    children = dict(container.named_children())

    def indices(targets: list[str]) -> list[int]:
        return [i for i in (_child_index(names, prefix, t) for t in targets) if i is not None]

    stem_at, feature_at, head_at = indices(stems), indices(features), indices(heads)
    start = max(stem_at, default=-1) + 1
    if feature_at:
        start = max(start, min(feature_at))
        end = max(feature_at)
        if stem_at and end <= max(stem_at):  # the stem and the stages share one child: look inside it
            child = names[max(stem_at)]
            return _trunk_in(children[child], f"{prefix}{child}.", stems, heads, features)
        stop = min([i for i in head_at if i > end], default=len(names))
        while end + 1 < stop and _is_block_list(children[names[end + 1]]):
            end += 1  # more blocks after the last listed feature (class-attention blocks)
    else:
        end = min(head_at, default=len(names)) - 1
    return [f"{prefix}{n}" for n in names[start:end + 1]]


#: words (between underscores and digits) of a module name that make it a position encoding: absolute tables and
#: their projections (``pos_embed``, ``pos_embd``), conditional position encodings (PEG / CPE convs: ``pos_block``,
#: ``cpe``, ``crpe``, ``peg``), relative position biases and their MLPs (``rel_pos``, ``relative_position_*``,
#: Swin-V2's continuous ``cpb_mlp``) and rotary embeddings
POSITION_WORDS = frozenset({"pos", "position", "positional", "cpe", "crpe", "peg", "cpb", "rope", "rotary"})


def _position_encodings(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """The outermost modules that are position encodings, by the model's ``no_weight_decay()`` or by name."""
    found: list[str] = []
    for name in modules:
        parts = name.split(".") if name else []
        for i, part in enumerate(parts):
            if POSITION_WORDS.intersection(re.split(r"[_\d]+", part.lower())):
                found.append(".".join(parts[:i + 1]))
                break
    listed = _no_weight_decay(model)
    if listed:
        for name, module in modules.items():  # a layer whose own weight is listed (not a table beside it)
            if isinstance(module, _LAYERS) and any(fnmatch.fnmatchcase(f"{name}.weight", p) for p in listed):
                found.append(name)
    return sorted(set(found))


def _no_weight_decay(model: nn.Module) -> list[str]:
    method = getattr(model, "no_weight_decay", None)
    if not callable(method):
        return []
    try:
        return [p for p in method() if isinstance(p, str)]
    except Exception:  # a model's optional helper that does not run on this configuration says nothing
        return []


def trunk(model: nn.Module) -> tuple[list[str], list[str]]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    modules = dict(model.named_modules())
    stems = [n for n in _names(cfg.get("first_conv")) if n in modules] or _first_layer(modules)
    heads = [n for n in _names(cfg.get("classifier")) if n in modules] or _classifier(model, modules)
    features = _feature_modules(model, modules)
    # the stem's first conv, the classifier and position encodings are never targets, wherever they sit
    return _trunk_in(model, "", stems, heads, features), stems + heads + _position_encodings(model, modules)


def _first_layer(modules: dict[str, nn.Module]) -> list[str]:
    """Without a pretrained_cfg (a class built directly): the first conv or linear layer starts the stem."""
    return next(([n] for n, m in modules.items() if isinstance(m, _LAYERS)), [])


def _classifier(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    return [n for n, m in modules.items() if n and m is head]


def _covers(model: nn.Module) -> bool:
    return from_library("timm")(model) and (hasattr(model, "pretrained_cfg") or hasattr(model, "feature_info"))


RULE = Rule("timm (pretrained_cfg first_conv / classifier, feature_info)", _covers, trunk)
