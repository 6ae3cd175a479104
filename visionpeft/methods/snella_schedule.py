"""SNELLA's budget schedule: the global number of non-zero entries over training, and its split over layers."""
from __future__ import annotations

import math
from typing import Sequence


def scheduled_budget(step: int, total_steps: int, initial: int, target: int, warmup: float, final: float) -> int:
    """Global number of non-zero entries at ``step``: ``initial`` during the warm-up, a cubic decay to
    ``target``, then ``target`` for the final phase (AdaLoRA's schedule, in steps)."""
    start = round(warmup * total_steps)
    end = total_steps - round(final * total_steps)
    if step <= start:
        return initial
    if step >= end:
        return target
    remaining = 1.0 - (step - start) / (end - start)
    return target + int((initial - target) * remaining ** 3)


def reallocation_budget(step: int, total_steps: int, initial: int, target: int, warmup: float, final: float,
                        interval: int) -> int | None:
    """The global budget to re-allocate at ``step``, or None when the allocation stays as it is. As the
    reference: never during the warm-up; during the decay at every step that is a multiple of ``interval``
    (counted from step 0, not from the end of the warm-up), its last step included (the budget there has
    reached ``target``); at every step of the final phase after it."""
    start = round(warmup * total_steps)
    end = total_steps - round(final * total_steps)
    if step <= start or (step <= end and step % interval):
        return None
    return scheduled_budget(step, total_steps, initial, target, warmup, final)


def allocate(budget: int, scores: Sequence[float], capacities: Sequence[int]) -> list[int]:
    """Split ``budget`` non-zeros over layers proportionally to ``scores``, capped at each capacity; what a
    full layer cannot take goes to the others. Returns counts summing to min(budget, Σ capacities)."""
    total = sum(scores)
    usable = math.isfinite(total) and total > 0
    shares = [s / total if usable else 1.0 / len(scores) for s in scores]
    kept = [0] * len(capacities)
    left = min(budget, sum(capacities))
    while left > 0:
        open_layers = [i for i, cap in enumerate(capacities) if kept[i] < cap]
        weight = sum(shares[i] for i in open_layers)
        portion = {i: shares[i] / weight if weight > 0 else 1.0 / len(open_layers) for i in open_layers}
        given = 0
        for i in open_layers:
            add = min(int(left * portion[i]), capacities[i] - kept[i])
            kept[i] += add
            given += add
        if given == 0:  # every proportional share rounded down to zero: one each, most important first
            for i in sorted(open_layers, key=lambda i: -portion[i])[:left]:
                kept[i] += 1
                given += 1
        left -= given
    return kept
