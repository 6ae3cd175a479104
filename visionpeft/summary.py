"""A readable account of what is attached and what trains."""
from __future__ import annotations

from collections import defaultdict

from torch import nn

from visionpeft.core import adapted_layers, records


def _count(params) -> int:
    return sum(p.numel() for p in params)


def summary(model: nn.Module) -> str:
    """Per adapter (method, active, merged) and layer kind: layers, slots and parameters; then the trainable
    share."""
    recs = records(model)
    order = {name: i for i, name in enumerate(recs)}
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    merged: set[str] = set()
    for _, layer in adapted_layers(model):
        merged |= set(layer._vp_merged)
        for adapter, slots in layer.vp_adapters.items():
            row = rows[(adapter, layer._vp_kind.name)]
            row[0] += 1
            row[1] += len(slots)
            row[2] += _count(slots.parameters())
    header = ("adapter", "method", "active", "merged", "layer kind", "layers", "weights", "parameters")
    table = [header] + [
        (a, recs[a].method if a in recs else "?", "yes" if a in recs and recs[a].active else "no",
         "yes" if a in merged else "no", k, f"{n:,}", f"{s:,}", f"{p:,}")
        for (a, k), (n, s, p) in sorted(rows.items(), key=lambda item: (order.get(item[0][0], len(order)), item[0]))]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i >= 5 else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    modules = dict(model.named_modules())
    for rec in records(model).values():
        for name in rec.unfreeze:
            lines.append(f"unfrozen: {name} ({type(modules[name]).__name__}, {_count(modules[name].parameters()):,} parameters)")
    for rec in records(model).values():
        if rec.reconstruction_error:
            errors = rec.reconstruction_error
            worst = max(errors, key=errors.get)
            lines.append(f"extracted {rec.name!r} ({rec.method}): relative reconstruction error per layer, "
                         f"mean {sum(errors.values()) / len(errors):.4f}, worst {errors[worst]:.4f} ({worst})")
            lines += [f"  {layer}: {err:.4f}" for layer, err in errors.items()]
    trainable = _count(p for p in model.parameters() if p.requires_grad)
    total = _count(model.parameters())
    share = 100.0 * trainable / total if total else 0.0
    lines.append(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}")
    return "\n".join(lines)
