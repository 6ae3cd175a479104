"""SNELLA's kernel: the two factors merged through the distance kernel and, for SNELLA, its softmax mixture.

The forward, the rebuild in backward and ``delta()`` (merge) all compute the kernel here and must round the
same way, so that the kept entries and the merged weight match the trained forward. ``snella_sparse.SparseKernel``
differentiates the kernel by hand, so these functions compute in place where they can and are not meant for
autograd.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

#: α_p of the distance kernel's two pieces (constants in the reference code); opposite signs are what
#: makes identical pieces an exact zero start
PIECE_WEIGHTS = (0.1, -0.1)


#: D² below this is clamped (round-off can make ‖r‖² + ‖c‖² − 2 r·c negative); no gradient flows there
SQUARED_DISTANCE_FLOOR = 1e-30


def pairwise_distances(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """‖rows[p, j] − columns[p, i]‖₂ for every piece p, shaped (P, len(rows), len(columns)).

    ‖r‖² + ‖c‖² − 2 r·c as one batched matmul of [r, ‖r‖², 1] and [−2c, 1, ‖c‖²], so the (out, in) result is
    written once. Not ``torch.cdist``, which runs other kernels with and without autograd: the forward, the
    rebuild in backward and ``delta()`` (merge) must round identically so that the kept entries and the merged
    weight match the trained forward.
    """
    ones = rows.new_ones(rows.shape[0], 1, 1)
    row_terms = torch.cat([rows, rows.pow(2).sum(-1, keepdim=True), ones.expand(-1, rows.shape[1], 1)], dim=-1)
    column_terms = torch.cat([columns * -2, ones.expand(-1, columns.shape[1], 1), columns.pow(2).sum(-1, keepdim=True)],
                             dim=-1)
    squared = torch.bmm(row_terms, column_terms.transpose(-1, -2))
    return squared.clamp_min_(SQUARED_DISTANCE_FLOOR).sqrt_()


def combine_pieces(distances: torch.Tensor, weights: Sequence[float] = PIECE_WEIGHTS,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_p weights[p] · distances[p], summed elementwise (not as a contraction), so identical pieces with
    weights of opposite sign give exactly zero. ``out`` may be ``distances[0]`` (computed in place)."""
    if len(weights) == 2 and weights[1] == -weights[0]:  # (α, −α) as in the reference: α · (D₀ − D₁), two passes
        return torch.sub(distances[0], distances[1], out=out).mul_(weights[0])
    kernel = torch.mul(distances[0], weights[0], out=out)
    for piece, weight in zip(distances[1:], weights[1:]):
        kernel.add_(piece * weight)  # not alpha=: a fused multiply-add would round differently
    return kernel


def distance_kernel(in_pieces: torch.Tensor, out_pieces: torch.Tensor,
                    weights: Sequence[float] = PIECE_WEIGHTS) -> torch.Tensor:
    """K[j, i] = Σ_p weights[p] · ‖out_pieces[p, j] − in_pieces[p, i]‖₂, shaped (out, in)."""
    return combine_pieces(pairwise_distances(out_pieces, in_pieces), weights)


def centred_softmax(kernel: torch.Tensor, temperature: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax over outputs (dim 0) of K / temperature, minus the uniform 1/out; computed as (e − Σe/out) / Σe,
    which is exactly zero when K is constant along the outputs. Written into ``out`` when given."""
    z = torch.div(kernel, temperature, out=out)
    e = z.sub_(z.amax(dim=0, keepdim=True)).exp_()
    total = e.sum(dim=0, keepdim=True)
    return e.sub_(total / kernel.shape[0]).div_(total)


def softmax_mixture(kernel: torch.Tensor, scale: torch.Tensor, temperature: torch.Tensor,
                    shift: torch.Tensor) -> torch.Tensor:
    """SNELLA's mixture K + scale · (softmax over outputs of K / temperature − 1/out) + shift; exactly zero when
    K is. Like every kernel function here it works in place and is not for autograd: :class:`SparseKernel`
    differentiates the kernel by hand."""
    return _mix(kernel, centred_softmax(kernel, temperature), scale, shift)


def _mix(kernel: torch.Tensor, centred: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
         in_place: bool = False) -> torch.Tensor:
    mixed = kernel.addcmul_(centred, scale) if in_place else torch.addcmul(kernel, centred, scale)
    return mixed.add_(shift)


class KernelTerms(NamedTuple):
    """The merged kernel and the intermediates its gradient needs (all (out, in) but ``distances``)."""

    distances: torch.Tensor  # (P, out, in)
    kernel: torch.Tensor  # Σ_p α_p D_p
    centred: torch.Tensor | None  # softmax over outputs of kernel / γ, minus 1/out (mixture only)
    value: torch.Tensor | None  # what is sparsified: the kernel, or the mixture


def kernel_terms(in_pieces: torch.Tensor, out_pieces: torch.Tensor, mixture: torch.Tensor | None = None) -> KernelTerms:
    """The distance kernel of the factors and, with ``mixture`` = (scale a, temperature γ, shift β), SNELLA's
    softmax mixture on top (β per input: β / fan_in, module docstring), with the intermediates. No autograd;
    autocast off, so the forward, the rebuild in backward and ``delta()`` all compute the same float32 values."""
    with torch.no_grad(), torch.autocast(in_pieces.device.type, enabled=False):
        distances = pairwise_distances(out_pieces, in_pieces)
        kernel = combine_pieces(distances)
        if mixture is None:
            return KernelTerms(distances, kernel, None, kernel)
        centred = centred_softmax(kernel, mixture[1])
        return KernelTerms(distances, kernel, centred, _mix(kernel, centred, mixture[0], mixture[2] / kernel.shape[1]))


def kernel_value(in_pieces: torch.Tensor, out_pieces: torch.Tensor, mixture: torch.Tensor | None = None) -> torch.Tensor:
    """``kernel_terms(...).value``, bit for bit (the same operations), computed in place in the two (out, in)
    buffers of the distances: what the forward needs, at a third of the transient memory."""
    with torch.no_grad(), torch.autocast(in_pieces.device.type, enabled=False):
        distances = pairwise_distances(out_pieces, in_pieces)
        kernel = combine_pieces(distances, out=distances[0])
        if mixture is None:
            return kernel
        centred = centred_softmax(kernel, mixture[1], out=distances[1])
        return _mix(kernel, centred, mixture[0], mixture[2] / kernel.shape[1], in_place=True)


def traced_kernel_value(in_pieces: torch.Tensor, out_pieces: torch.Tensor,
                        mixture: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`kernel_value`'s operations out of place, for autograd to differentiate: the form ``torch.compile``
    traces (the hand-written backward of ``snella_sparse.SparseKernel`` and its in-place buffers are for eager
    mode). The same operations in the same order, so the values are those of :func:`kernel_value`."""
    rows, columns = out_pieces, in_pieces
    ones = rows.new_ones(rows.shape[0], 1, 1)
    row_terms = torch.cat([rows, rows.pow(2).sum(-1, keepdim=True), ones.expand(-1, rows.shape[1], 1)], dim=-1)
    column_terms = torch.cat([columns * -2, ones.expand(-1, columns.shape[1], 1), columns.pow(2).sum(-1, keepdim=True)],
                             dim=-1)
    distances = torch.bmm(row_terms, column_terms.transpose(-1, -2)).clamp_min(SQUARED_DISTANCE_FLOOR).sqrt()
    weights = PIECE_WEIGHTS
    if len(weights) == 2 and weights[1] == -weights[0]:
        kernel = (distances[0] - distances[1]) * weights[0]
    else:
        kernel = distances[0] * weights[0]
        for piece, weight in zip(distances[1:], weights[1:]):
            kernel = kernel + piece * weight
    if mixture is None:
        return kernel
    z = kernel / mixture[1]
    e = (z - z.amax(dim=0, keepdim=True).detach()).exp()  # the shift cancels in the softmax: no gradient through it
    total = e.sum(dim=0, keepdim=True)
    centred = (e - total / kernel.shape[0]) / total
    return torch.addcmul(kernel, centred, mixture[0]) + mixture[2] / kernel.shape[1]
