"""Chosen entries of a weight's gradient, without the dense product: for a linear op ``Σ_t g[t, i] · x[t, j]``
for listed (i, j); for a 2-D convolution the same over the unfolded input (im2col), one batch chunk at a time.

A sparse method that trains a few percent of a weight needs only those entries of its gradient. torch's CSR sampled
product (``torch.sparse.sampled_addmm``) measured no faster than the dense matmul on CPU. A gather-dot compiled by
inductor is one fused loop (per entry, the dot of row i of gᵀ and row j of xᵀ; nothing entries × tokens is
materialized): faster than the dense product below about 15 % of the entries, slower above 20 %
(``python benchmarks/sara.py --backprop``). It compiles once per process and dtype (a few seconds); where compiling
fails (no C++ compiler, no Triton) the dense product is gathered instead, with a warning.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

#: unfolded-input elements per chunk of a convolution's batch (128 MB in float32)
CONV_CHUNK_ELEMENTS = 2**25

_compiled = None
#: None: not tried yet; True: the compiled form ran; False: it failed and the dense product is used
_compiled_works: bool | None = None


def _gather_dot(left: torch.Tensor, right: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return (left[rows] * right[cols]).sum(-1)


def sampled_product(left: torch.Tensor, right: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Entries ``(rows[k], cols[k])`` of ``left · rightᵀ`` for ``left`` (m, K) and ``right`` (n, K)."""
    global _compiled, _compiled_works
    if torch.compiler.is_compiling():  # inside a compiled model the expression is fused with the rest
        return _gather_dot(left, right, rows, cols)
    left, right = left.contiguous(), right.contiguous()
    if _compiled_works is not False:
        if _compiled is None:
            _compiled = torch.compile(_gather_dot, dynamic=True)
        if _compiled_works:
            return _compiled(left, right, rows, cols)
        try:
            result = _compiled(left, right, rows, cols)
        except Exception as error:  # noqa: BLE001 - any compiler failure: fall back, once, loudly
            _compiled_works = False
            warnings.warn(f"visionpeft: the compiled sampled weight gradient is unavailable ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); using the dense product", RuntimeWarning)
        else:
            _compiled_works = True
            return result
    return (left @ right.t())[rows, cols]


def sampled_weight_gradient(grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                            dtype: torch.dtype) -> torch.Tensor:
    """Entries ``(rows[k], cols[k])`` of a linear op's weight gradient ``grad_outᵀ · x`` (tokens flattened), in ``dtype``."""
    g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
    inputs = x.reshape(-1, x.shape[-1]).to(dtype)
    return sampled_product(g.t(), inputs.t(), rows, cols)


def sampled_conv2d_weight_gradient(grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                                   dtype: torch.dtype, kernel_size: Sequence[int], stride: Sequence[int],
                                   dilation: Sequence[int], padding_sides: Sequence[int]) -> torch.Tensor:
    """Entries of an ungrouped 2-D convolution's weight gradient, the weight flattened to (out, in · kh · kw):
    ``cols`` index the unfolded input's rows. ``padding_sides`` is ``F.pad``'s (left, right, top, bottom), zeros."""
    if x.dim() == 3:  # unbatched
        x, grad_out = x.unsqueeze(0), grad_out.unsqueeze(0)
    if any(padding_sides):
        x = F.pad(x, tuple(padding_sides))
    per_sample = x.shape[1] * math.prod(kernel_size) * grad_out[0, 0].numel()
    chunk = max(1, CONV_CHUNK_ELEMENTS // max(1, per_sample))
    total = None
    for start in range(0, x.shape[0], chunk):
        unfolded = F.unfold(x[start:start + chunk].to(dtype), tuple(kernel_size), dilation=tuple(dilation),
                            stride=tuple(stride))  # (n, in · kh · kw, positions)
        g = grad_out[start:start + chunk].to(dtype).flatten(2)  # (n, out, positions)
        part = sampled_product(g.transpose(0, 1).reshape(g.shape[1], -1),
                               unfolded.transpose(0, 1).reshape(unfolded.shape[1], -1), rows, cols)
        total = part if total is None else total.add_(part)
    return total
