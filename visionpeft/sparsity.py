"""Per-layer densities of sparse adapters, for logging and plotting (e.g. SNELLA's allocation over training)."""
from __future__ import annotations

from torch import nn

from visionpeft.core import adapted_layers


def sparsity_report(model: nn.Module, adapter: str = "default") -> dict[str, float]:
    """Fraction of each adapted weight's entries that may be non-zero now, for methods that budget them.

    Keys are ``"layer:slot"``, with ``".i"`` appended for block ``i`` of a fused q/k/v projection
    (``"blocks.0.attn.qkv:weight.1"`` is k). Methods without a density (LoRA, ...) are left out.
    """
    report = {}
    for layer_name, layer in adapted_layers(model):
        slots = layer.vp_adapters[adapter] if adapter in layer.vp_adapters else {}
        for slot_name, methods in slots.items():
            blocks = list(methods) if isinstance(methods, nn.ModuleList) else [methods]
            for i, method in enumerate(blocks):
                if hasattr(method, "current_density"):
                    suffix = f".{i}" if isinstance(methods, nn.ModuleList) else ""
                    report[f"{layer_name}:{slot_name}{suffix}"] = method.current_density
    return report
