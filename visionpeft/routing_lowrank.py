"""The low-rank paths of ``vp.routing``: every routed adapter on a linear layer is a plain low-rank branch
``scale · up · down`` (``Method.low_rank_branch``: LoRA), so no activation needs to be gathered or scattered.

- Interleaved samples: each sample's own adapter's factors are gathered per sample (rows of a sample whose adapter
  does not adapt the layer get zero factors) and the branches run as one pair of batched products.
- Each adapter's samples consecutive, without autograd: each adapter runs the two plain products of one active
  adapter on its slice of rows, with no factor gathered or padded.
- Where the base is a plain dense ``nn.Linear`` and no gradient is taken, the bias enters the up-projection as one
  more rank (a column of ones beside the hidden activations, the bias as that rank's row of the up factor): the branch
  product writes the output and the base GEMM accumulates into it. The output is written once and updated once,
  where a base op (bias copied in, GEMM added) and an in-place branch update touch it five times; at ViT-S/16 size
  that is about a gigabyte of memory traffic per batch of 16.

Written here rather than taken from a library: none runs per-sample LoRA factors of mixed ranks as one product.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

#: ``(down (rank, in), up (out, rank), scale)``
Branch = tuple[torch.Tensor, torch.Tensor, float]
_PLAIN = (torch.Tensor, nn.Parameter)


def low_rank_branches(adapters: Sequence[str | None], layer: nn.Module, args: tuple,
                      x: torch.Tensor) -> list[Branch | None] | None:
    """Per adapter of ``adapters`` its branch on this single-input linear layer (None where it does not adapt the
    layer), when every routed adapter is a plain low-rank branch in x's dtype; else None."""
    kind = layer._vp_kind
    if not (kind.single_input and args and args[0] is x) or len(layer._vp_slots) != 1 \
            or torch.is_autocast_enabled(x.device.type):
        return None
    slot_name, slot = next(iter(layer._vp_slots.items()))
    branches: list[Branch | None] = []
    for name in adapters:
        slots = layer.vp_adapters[name] if name in layer.vp_adapters else {}
        method = slots[slot_name] if slot_name in slots else None
        if method is None:
            branches.append(None)
            continue
        branch = None if isinstance(method, nn.ModuleList) else method.low_rank_branch(slot)
        if branch is None or branch[0].dtype != x.dtype:
            return None
        branches.append(branch)
    return branches if any(b is not None for b in branches) else None


def dense_linear(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, bias)`` of a layer whose base op is exactly ``nn.Linear.forward`` on plain dense tensors in x's
    dtype (not a quantized or sharded weight), so that ``x · weightᵀ + bias`` may stand in for it; else None."""
    if layer._vp_base_class.forward is not nn.Linear.forward:
        return None
    weight, bias = layer.weight, layer.bias
    for tensor in (weight, bias):
        if tensor is not None and (type(tensor) not in _PLAIN or tensor.layout != torch.strided
                                   or tensor.dtype != x.dtype or tensor.device != x.device):
            return None
    return weight, bias


def _stacked_factors(branches: Sequence[Branch | None],
                     bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(downs (adapters, rank, in), ups (adapters, out, rank))``, zero-padded to the largest rank (zero rows and
    columns: exact) with the scale folded into up; with ``bias``, ups get one more rank column holding it."""
    like = next(b for b in branches if b is not None)
    in_features, out_features = like[0].shape[1], like[1].shape[0]
    rank = max(b[0].shape[0] for b in branches if b is not None)
    downs, ups = [], []
    for branch in branches:
        if branch is None:
            down, up = like[0].new_zeros(rank, in_features), like[1].new_zeros(out_features, rank)
        else:
            down, up, scale = branch
            pad = rank - down.shape[0]
            down = torch.nn.functional.pad(down, (0, 0, 0, pad)) if pad else down
            up = torch.nn.functional.pad(up * scale, (0, pad)) if pad else up * scale
        downs.append(down)
        ups.append(up)
    ups = torch.stack(ups)
    if bias is not None:
        ups = torch.cat([ups, bias[None, :, None].expand(len(branches), -1, 1)], -1)
    return torch.stack(downs), ups


def _per_sample(factors: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """Each sample's own adapter's factor, transposed for ``bmm``: (samples, ·, ·)."""
    return factors.index_select(0, sample_index).transpose(1, 2)


def _with_ones(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` with a last column of ones: the rank that carries the bias."""
    return torch.cat([hidden, hidden.new_ones(*hidden.shape[:-1], 1)], -1)


def batched_branches(out: torch.Tensor, x: torch.Tensor, branches: Sequence[Branch | None],
                     sample_index: torch.Tensor) -> torch.Tensor:
    """``out`` (the base op over the whole batch) plus each sample's own adapter's branch, as one pair of batched
    products over the per-sample factors; in place where no gradient needs ``out``."""
    downs, ups = _stacked_factors(branches, None)
    n = sample_index.numel()
    hidden = torch.bmm(x.reshape(n, -1, x.shape[-1]), _per_sample(downs, sample_index))
    up_t = _per_sample(ups, sample_index)
    if out.is_contiguous() and not (torch.is_grad_enabled() and (out.requires_grad or hidden.requires_grad)):
        out.view(n, -1, out.shape[-1]).baddbmm_(hidden, up_t)
        return out
    return torch.baddbmm(out.reshape(n, -1, out.shape[-1]), hidden, up_t).view(out.shape)


def fused_batched_branches(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           branches: Sequence[Branch | None], sample_index: torch.Tensor) -> torch.Tensor:
    """Without autograd, a dense linear base: the per-sample branches (and the bias, as one more rank) write the
    output in one batched product, then the base GEMM accumulates into it."""
    downs, ups = _stacked_factors(branches, bias)
    n, out_features = sample_index.numel(), weight.shape[0]
    x3 = x.reshape(n, -1, x.shape[-1])
    hidden = torch.bmm(x3, _per_sample(downs, sample_index))
    out = torch.bmm(hidden if bias is None else _with_ones(hidden), _per_sample(ups, sample_index))
    out.view(-1, out_features).addmm_(x3.reshape(-1, x.shape[-1]), weight.t())
    return out.view(*x.shape[:-1], out_features)


def contiguous_products(out: torch.Tensor, x: torch.Tensor, branches: Sequence[Branch | None],
                        runs: Sequence[tuple[int, int, int]], samples: int) -> torch.Tensor:
    """Without autograd, where each adapter's samples are consecutive (``runs``: adapter position, first and end
    sample): ``out`` (the base op over the whole batch), then per adapter ``out[rows] += scale · (x[rows] · downᵀ) ·
    upᵀ`` in place on its slice of rows."""
    block = x.shape[0] // samples
    x_rows = x.reshape(x.shape[0], -1, x.shape[-1])
    out_rows = out.view(out.shape[0], -1, out.shape[-1])
    for position, start, stop in runs:
        if branches[position] is None:
            continue
        down, up, scale = branches[position]
        rows = x_rows[start * block:stop * block].reshape(-1, x.shape[-1])
        out_rows[start * block:stop * block].view(-1, out.shape[-1]).addmm_(rows @ down.t(), up.t(), alpha=scale)
    return out


def fused_contiguous_products(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              branches: Sequence[Branch | None], runs: Sequence[tuple[int, int, int]],
                              samples: int) -> torch.Tensor:
    """Without autograd, a dense linear base, each adapter's samples consecutive: per adapter its branch (and the
    bias, as one more rank) writes its slice of rows, base rows get the bias; then the base GEMM accumulates into the
    whole output."""
    out_features, in_features = weight.shape
    out = x.new_empty(*x.shape[:-1], out_features)
    block = x.shape[0] // samples
    x_rows = x.reshape(x.shape[0], -1, in_features)
    out_rows = out.view(out.shape[0], -1, out_features)
    for position, start, stop in runs:
        target = out_rows[start * block:stop * block].view(-1, out_features)
        if branches[position] is None:
            target.copy_(bias) if bias is not None else target.zero_()
            continue
        down, up, scale = branches[position]
        hidden = x_rows[start * block:stop * block].reshape(-1, in_features) @ down.t()
        up_t = up.t() * scale
        if bias is not None:
            hidden, up_t = _with_ones(hidden), torch.cat([up_t, bias[None]])
        torch.mm(hidden, up_t, out=target)
    out.view(-1, out_features).addmm_(x.reshape(-1, in_features), weight.t())
    return out
