"""``vp.combine``: a new LoRA adapter whose update is Σ_k w_k · ΔW_k of attached adapters.

``cat`` stacks the factors (exact, rank = Σ ranks); ``linear`` sums same-rank factors as PEFT does,
B = Σ_k sign(w_k)·c_k·B_k and A = Σ_k c_k·A_k with c_k = √|w_k·scale_k|; ``svd`` truncates the weighted sum of any
methods' ΔW at ``rank`` (exact at full rank); ``ties``, ``dare_linear`` and ``dare_ties`` are the task-arithmetic merges
of PEFT's ``add_weighted_adapter``, applied to the A and to the B factors with the weights c_k (DARE's random drop from a
generator seeded by ``seed``, so a combine is reproducible). The new adapter is attached inactive, like PEFT's weighted
adapter: ``vp.set_active(model, name)`` makes it the one that runs.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
from torch import nn

HOWS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties")
_HOW_OPTIONS = {"cat": (), "linear": (), "svd": (), "ties": ("density", "majority_sign"),
                "dare_linear": ("density", "seed"), "dare_ties": ("density", "majority_sign", "seed")}
_LORA_ONLY = ("cat", "linear", "ties", "dare_linear", "dare_ties")
MAJORITY_SIGNS = ("total", "frequency")


def _check(model: nn.Module, weights: Any, how: str, rank: Any, options: dict[str, Any]) -> dict[str, float]:
    from visionpeft.by_name import check_names
    from visionpeft.core import records

    if how not in HOWS:
        raise ValueError(f"combine: how={how!r} is unknown; allowed: {', '.join(HOWS)}")
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"combine: weights={weights!r} must be a non-empty dict {{adapter name: weight}}")
    check_names(model, list(weights), "combine")
    bad = {k: v for k, v in weights.items() if not isinstance(v, Real) or isinstance(v, bool)}
    if bad:
        raise ValueError(f"combine: weight(s) {bad} must be numbers")
    unknown = sorted(set(options) - set(_HOW_OPTIONS[how]))
    if unknown:
        raise ValueError(f"combine: option(s) {unknown} do not apply to how={how!r}; "
                         f"it takes: {', '.join(_HOW_OPTIONS[how]) or '(none)'}")
    density = options.get("density", 1.0)
    if "density" in _HOW_OPTIONS[how] and not (isinstance(density, Real) and 0 < density <= 1):
        raise ValueError(f"combine: density={density!r} must be a number in (0, 1]")
    if options.get("majority_sign", "total") not in MAJORITY_SIGNS:
        raise ValueError(f"combine: majority_sign={options['majority_sign']!r}; allowed: {', '.join(MAJORITY_SIGNS)}")
    if not isinstance(options.get("seed", 0), int):
        raise ValueError(f"combine: seed={options['seed']!r} must be an int")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"combine: rank={rank!r} must be an int >= 1")
    if how in _LORA_ONLY:
        other = {n: records(model)[n].method for n in weights if records(model)[n].method != "lora"}
        if other:
            raise ValueError(f"combine: how={how!r} combines LoRA factors, but {other} are other methods; "
                             f"use how='svd' (any methods, a truncated SVD of the weighted sum)")
    elif rank is None:
        raise ValueError("combine: how='svd' needs rank= (the rank of the new LoRA adapter)")
    return {n: float(w) for n, w in weights.items()}


def _factors(layer: nn.Module, slot: str, names: list[str]) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    return [tuple(t.float() if isinstance(t, torch.Tensor) else t for t in layer.vp_adapters[n][slot].factors())
            for n in names]


def _prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[tensor.abs().flatten().topk(keep).indices] = 1
    return tensor * mask.view(tensor.shape)


def _prune_random(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    keep = torch.bernoulli(torch.full(tensor.shape, density), generator=generator).to(tensor)
    return tensor * keep / density


def _disjoint_merge(weighted: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """Σ over the inputs that agree with the majority sign, divided by how many agree (TIES)."""
    signs = weighted.sign()
    magnitude = weighted.sum(0) if majority_sign == "total" else signs.sum(0)
    majority = torch.where(magnitude >= 0, 1.0, -1.0).to(weighted)
    agree = signs == majority
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def task_arithmetic(tensors: list[torch.Tensor], weights: list[float], how: str, density: float = 1.0,
                    majority_sign: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """One merged tensor of ``tensors`` with ``weights`` by ``how`` (linear, ties, dare_linear, dare_ties)."""
    if how in ("ties",):
        tensors = [_prune_magnitude(t, density) for t in tensors]
    elif how in ("dare_linear", "dare_ties"):
        tensors = [_prune_random(t, density, generator) for t in tensors]
    weighted = torch.stack([w * t for w, t in zip(weights, tensors)])
    if how in ("ties", "dare_ties"):
        return _disjoint_merge(weighted, majority_sign)
    return weighted.sum(0)


def _combined_factors(layer: nn.Module, slot: str, weights: dict[str, float], how: str, rank: int | None,
                      options: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down: r × fan_in, up: out × r) with ΔW = up · down."""
    names = [n for n in weights if n in layer.vp_adapters and slot in layer.vp_adapters[n]]
    if how == "svd":
        delta = sum(weights[n] * layer.vp_delta(n, slot) for n in names)
        matrix = delta.reshape(delta.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        return (root[:, None] * vh[:r]).float(), (u[:, :r] * root).float()
    factors = _factors(layer, slot, names)
    if how == "cat":
        return (torch.cat([a for a, _, _ in factors]),
                torch.cat([weights[n] * s * b for n, (_, b, s) in zip(names, factors)], dim=1))
    ranks = {n: a.shape[0] for n, (a, _, _) in zip(names, factors)}
    if len(set(ranks.values())) > 1:
        raise ValueError(f"combine: how={how!r} needs LoRAs of one rank, but on slot {slot!r} the ranks are {ranks}; "
                         f"use how='cat' or how='svd'")
    coeffs = [math.sqrt(abs(weights[n] * s)) for n, (_, _, s) in zip(names, factors)]
    signs = [math.copysign(1.0, weights[n]) for n in names]
    extra = {k: options[k] for k in ("density", "majority_sign") if k in options}
    down = task_arithmetic([a for a, _, _ in factors], coeffs, how, generator=generator, **extra)
    up = task_arithmetic([b for _, b, _ in factors], [c * g for c, g in zip(coeffs, signs)], how,
                         generator=generator, **extra)
    return down, up


def combine(model: nn.Module, weights: dict[str, float], *, name: str, how: str = "svd", rank: int | None = None,
            **how_options: Any) -> nn.Module:
    """Attach a new LoRA adapter ``name`` (inactive) whose update is Σ_k ``weights[k]`` · ΔW_k (see the module
    docstring for ``how``). Everything is checked, and every factor computed, before the model changes."""
    from visionpeft.core import adapted_layers, install, plan
    from visionpeft.targeting import Target

    weights = _check(model, weights, how, rank, how_options)
    generator = torch.Generator().manual_seed(how_options.get("seed", 0))
    targets, factors = [], {}
    with torch.no_grad():
        for layer_name, layer in adapted_layers(model):
            slots = list(dict.fromkeys(s for n in weights if n in layer.vp_adapters for s in layer.vp_adapters[n]))
            if not slots:
                continue
            targets.append(Target(layer_name, layer, layer._vp_kind, slots))
            for slot in slots:
                try:
                    factors[(layer_name, slot)] = _combined_factors(layer, slot, weights, how, rank, how_options, generator)
                except ValueError as err:
                    raise ValueError(f"{err} (layer {layer_name!r})") from None
    ranks = {key: down.shape[0] for key, (down, _) in factors.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    layer_options = {}
    for (layer_name, _), r in ranks.items():
        if r != common:
            if layer_options.get(layer_name, {}).get("rank", r) != r:
                raise ValueError(f"combine: layer {layer_name!r} would need two ranks; use how='svd'")
            layer_options[layer_name] = {"rank": r}
    result = plan(model, "lora", targets, name, [], {"rank": common, "alpha": None}, layer_options)
    result.record.active = False
    for (layer_name, slot), (down, up) in factors.items():
        result.instances[layer_name][slot].set_factors(down, up, 1.0)
    install(model, result)
    return model
