"""``vp.routing``: a mixed batch in which sample i runs with adapter ``per_sample[i]`` alone (``None``: the base model).

Where every routed adapter on a linear layer is a plain low-rank branch (LoRA), the branches run on the whole batch
with each sample's own factors and no activation is gathered or scattered (``visionpeft.routing_lowrank``). Elsewhere
each adapted layer groups the rows of its input by adapter and runs its ordinary forward once per group with only that
group's adapter, on that group's rows: the base op runs once over the batch in pieces, and each adapter's branch
(activation path, weight path W + ΔW, or output tap) only on its own rows. So every method is served, inference and
training alike, and each sample's output is the one it gets with its adapter active alone.

A layer's batch is dimension 0 of its first input (dimension 1 for a ``nn.MultiheadAttention`` that is not
``batch_first``). A layer whose batch is a multiple of the model's (a windowed attention's ``B·windows``, a mask of
``B·heads``) gives each sample a block of consecutive rows.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from visionpeft import routing_lowrank as lowrank


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


class Route:
    """The groups of one mixed batch: per adapter (or base), the rows its samples own."""

    def __init__(self, per_sample: Sequence[str | None], layer_names: dict[int, str]) -> None:
        self.per_sample = list(per_sample)
        self.layer_names = layer_names
        #: the distinct entries of per_sample, in order of first appearance
        self.adapters = list(dict.fromkeys(self.per_sample))
        self._sample_index: dict[torch.device, torch.Tensor] = {}
        self._runs: list[tuple[int, int, int]] | None = None
        self._cache: dict[tuple[int, torch.device], tuple[list[tuple[list[str], Any]], torch.Tensor | None]] = {}

    def groups(self, rows: int, device: torch.device, layer: nn.Module):
        """``([(adapter names, rows as a slice or an index tensor)], inverse permutation or None)``."""
        key = (rows, device)
        if key not in self._cache:
            n = len(self.per_sample)
            if rows % n:
                raise ValueError(f"routing: layer {self.layer_names.get(id(layer), '?')!r} sees a batch of {rows}, "
                                 f"which is not a multiple of the {n} samples in per_sample")
            block = rows // n
            order: dict[str | None, list[int]] = {}
            for i, adapter in enumerate(self.per_sample):
                order.setdefault(adapter, []).extend(range(i * block, (i + 1) * block))
            groups, permutation = [], []
            for adapter, members in order.items():
                names = [] if adapter is None else [adapter]
                if members == list(range(members[0], members[0] + len(members))):
                    groups.append((names, slice(members[0], members[0] + len(members))))
                else:
                    groups.append((names, torch.tensor(members, device=device)))
                permutation.extend(members)
            inverse = None
            if permutation != list(range(rows)):
                inverse = torch.empty(rows, dtype=torch.long)
                inverse[torch.tensor(permutation)] = torch.arange(rows)
                inverse = inverse.to(device)
            self._cache[key] = (groups, inverse)
        return self._cache[key]

    def runs(self) -> list[tuple[int, int, int]]:
        """``(adapter position in :attr:`adapters`, first sample, end sample)`` per run of consecutive samples that
        share an adapter, in batch order."""
        if self._runs is None:
            position = {name: i for i, name in enumerate(self.adapters)}
            runs: list[list[int]] = []
            for i, name in enumerate(self.per_sample):
                if runs and runs[-1][0] == position[name]:
                    runs[-1][2] = i + 1
                else:
                    runs.append([position[name], i, i + 1])
            self._runs = [tuple(r) for r in runs]
        return self._runs

    def sample_index(self, device: torch.device) -> torch.Tensor:
        """Per sample, its adapter's position in :attr:`adapters`."""
        if device not in self._sample_index:
            position = {name: i for i, name in enumerate(self.adapters)}
            self._sample_index[device] = torch.tensor([position[n] for n in self.per_sample], device=device)
        return self._sample_index[device]

    def _run_low_rank(self, layer: nn.Module, args: tuple, kwargs: dict, x: torch.Tensor, branches) -> torch.Tensor:
        contiguous = len(self.runs()) == len(self.adapters)
        dense = None if torch.is_grad_enabled() else lowrank.dense_linear(layer, x)
        if dense is not None:
            if contiguous:
                return lowrank.fused_contiguous_products(x, *dense, branches, self.runs(), len(self.per_sample))
            return lowrank.fused_batched_branches(x, *dense, branches, self.sample_index(x.device))
        out = layer._vp_base_class.forward(layer, *args, **kwargs)
        if contiguous and out.is_contiguous() and not torch.is_grad_enabled():
            return lowrank.contiguous_products(out, x, branches, self.runs(), len(self.per_sample))
        return lowrank.batched_branches(out, x, branches, self.sample_index(x.device))

    def run(self, layer: nn.Module, args: tuple, kwargs: dict) -> Any:
        x = _first_tensor(args, kwargs)
        dim = 1 if isinstance(layer, nn.MultiheadAttention) and not layer.batch_first else 0
        groups, inverse = self.groups(x.shape[dim], x.device, layer)
        if len(groups) == 1:
            return layer.vp_forward(args, kwargs, groups[0][0])
        branches = lowrank.low_rank_branches(self.adapters, layer, args, x)
        if branches is not None:
            return self._run_low_rank(layer, args, kwargs, x, branches)
        rows = x.shape[dim]
        outputs = []
        for names, index in groups:
            sub_args = tuple(_take(a, dim, index, rows) for a in args)
            sub_kwargs = {k: _take_keyword(k, v, dim, index, rows) for k, v in kwargs.items()}
            outputs.append(layer.vp_forward(sub_args, sub_kwargs, names))
        if isinstance(outputs[0], torch.Tensor) and inverse is not None and not outputs[0].requires_grad:
            return _scattered(outputs, [index for _, index in groups], dim)
        return _joined(outputs, dim, inverse)


def _take(value: Any, dim: int, index: Any, rows: int) -> Any:
    """``value``'s rows ``index`` along ``dim`` when it carries the batch there (a multiple of it: blocks)."""
    if not isinstance(value, torch.Tensor) or value.dim() <= dim or value.shape[dim] % rows:
        return value
    block = value.shape[dim] // rows
    if block > 1:  # e.g. an attention mask of B·heads rows
        if isinstance(index, slice):
            index = slice(index.start * block, index.stop * block)
        else:
            index = (index[:, None] * block + torch.arange(block, device=index.device)).flatten()
    if isinstance(index, slice):
        return value.narrow(dim, index.start, index.stop - index.start)
    return value.index_select(dim, index)


def _take_keyword(name: str, value: Any, dim: int, index: Any, rows: int) -> Any:
    """Attention masks are batch-first; a 2-D ``attn_mask`` (target × source) is shared by every sample."""
    if name == "attn_mask" and isinstance(value, torch.Tensor) and value.dim() < 3:
        return value
    return _take(value, 0 if name in ("key_padding_mask", "attn_mask") else dim, index, rows)


def _scattered(outputs: list[torch.Tensor], indices: list[Any], dim: int) -> torch.Tensor:
    """Without autograd: each group's rows written in place into one output (one copy, not a cat and a gather)."""
    first = outputs[0]
    shape = list(first.shape)
    shape[dim] = sum(o.shape[dim] for o in outputs)
    out = first.new_empty(shape)
    for part, index in zip(outputs, indices):
        if isinstance(index, slice):
            out.narrow(dim, index.start, index.stop - index.start).copy_(part)
        else:
            out.index_copy_(dim, index, part)
    return out


def _joined(outputs: list[Any], dim: int, inverse: torch.Tensor | None) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        joined = torch.cat(outputs, dim=dim)
        return joined if inverse is None else joined.index_select(dim, inverse)
    if isinstance(first, (tuple, list)):  # e.g. MultiheadAttention's (output, weights): weights batch-first
        parts = [_joined([o[i] for o in outputs], dim if i == 0 else 0, inverse) for i in range(len(first))]
        return type(first)(parts)
    if first is None:
        return None
    raise ValueError(f"routing: a layer returned {type(first).__name__}, which cannot be joined across groups")


@contextlib.contextmanager
def routing(model: nn.Module, per_sample: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside, sample i of a batch runs with adapter ``per_sample[i]`` alone (``None``: the base model); the list is
    as long as the batch. Serves inference and training; merged adapters must be unmerged first."""
    from visionpeft.by_name import check_names, merged_adapters
    from visionpeft.core import adapted_layers

    if not isinstance(per_sample, (list, tuple)) or not per_sample:
        raise ValueError(f"routing: per_sample={per_sample!r} must be a non-empty list of adapter names or None")
    check_names(model, [n for n in dict.fromkeys(per_sample) if n is not None], "routing")
    merged = sorted(merged_adapters(model))
    if merged:
        raise ValueError(f"routing: adapter(s) {merged} are merged into the weights; unmerge first")
    layers = list(adapted_layers(model))
    route = Route(per_sample, {id(layer): name for name, layer in layers})

    def check_batch(_module, args, kwargs):
        x = _first_tensor(args, kwargs)
        if x is not None and x.dim() > 0 and x.shape[0] != len(route.per_sample):
            raise ValueError(f"routing: per_sample has {len(route.per_sample)} entries but the batch has "
                             f"{x.shape[0]} samples")

    handle = model.register_forward_pre_hook(check_batch, with_kwargs=True)
    before = [(layer, layer._vp_route) for _, layer in layers]
    try:
        for _, layer in layers:
            layer._vp_route = route
        yield model
    finally:
        handle.remove()
        for layer, previous in before:
            layer._vp_route = previous
