"""SNELLA's sparsifier: the ``budget`` largest-magnitude entries of the kernel, and the autograd functions that
build ΔW from the factors without keeping anything (out, in)-sized between forward and backward.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from visionpeft.methods.snella_kernel import (PIECE_WEIGHTS, SQUARED_DISTANCE_FLOOR, KernelTerms, kernel_terms,
                                             kernel_value, traced_kernel_value)


class TopSelection(NamedTuple):
    """The ``budget`` largest of some magnitudes: every entry above ``threshold``, plus the first ``ties``
    (in flat order) of those equal to it (``ties=None``: all of those). A threshold, not a mask, so the
    backward can find the same entries again without keeping anything weight-sized or sorting again."""

    budget: int
    threshold: torch.Tensor | None  # None when nothing is dropped
    ties: int | None

    def mask(self, magnitude: torch.Tensor, in_place: bool = False) -> torch.Tensor | None:
        """1 on the kept entries of ``magnitude``, 0 elsewhere (in its dtype: float arithmetic runs several times
        faster than a boolean mask and ``torch.where`` on CPU), written over ``magnitude`` when ``in_place``;
        None when every entry is kept."""
        if self.threshold is None:
            return None
        if self.budget <= 0:
            return magnitude.zero_() if in_place else torch.zeros_like(magnitude)
        if self.ties is None:  # sign(|k| − t) + 1, capped at 1: 1 at or above the threshold, 0 below
            shifted = magnitude.sub_(self.threshold) if in_place else magnitude - self.threshold
            return shifted.sign_().add_(1).clamp_max_(1)
        tied = magnitude == self.threshold
        first = tied.flatten().cumsum(0).view_as(tied) <= self.ties
        kept = (magnitude > self.threshold) | (tied & first)
        return magnitude.copy_(kept) if in_place else kept.to(magnitude.dtype)


def select_largest(magnitude: torch.Tensor, budget: int) -> TopSelection:
    """The ``budget`` largest entries of a non-negative ``magnitude`` (exactly ``budget``, ties broken in flat
    order), found by a radix pass on the float bits: a histogram of the top 16 bits locates the bucket holding
    the budget-th largest, and only that bucket is searched. Faster than ``topk`` on CPU (benchmarks/README.md),
    and not subject to torch.quantile's 2^24 limit."""
    numel = magnitude.numel()
    if budget >= numel:
        return TopSelection(budget, None, None)
    if budget <= 0:
        return TopSelection(budget, magnitude.new_tensor(math.inf), 0)
    flat = magnitude.detach().flatten()
    bits = {torch.float32: (torch.int32, 16), torch.float64: (torch.int64, 48)}.get(flat.dtype)
    if bits is None:  # other dtypes: plain topk
        largest = flat.topk(budget, sorted=False).values
        threshold = largest.min()
        above = int((largest > threshold).sum())
    else:  # non-negative floats order like their bit patterns
        integer, shift = bits
        bucket = flat.view(integer) >> shift
        counts = torch.bincount(bucket, minlength=1 << 15)
        at_or_above = counts.flip(0).cumsum(0).flip(0)
        index = int((at_or_above >= budget).sum()) - 1
        candidates = flat[bucket == index]
        above = int(at_or_above[index]) - candidates.numel()
        need = budget - above
        threshold = candidates.kthvalue(candidates.numel() - need + 1).values
        above += int((candidates > threshold).sum())
        flat = candidates
    tied = int((flat == threshold).sum())
    return TopSelection(budget, threshold, None if above + tied == budget else budget - above)


def keep_largest(kernel: torch.Tensor, budget: int) -> torch.Tensor:
    """``kernel`` with all but its ``budget`` largest-magnitude entries set to zero (exactly ``budget`` kept)."""
    return DeltaState(budget).sparse(kernel.clone())


class DeltaState:
    """What one forward's ΔW shares with its backward: the selection of kept entries (found once, in the
    forward) and, when the weight path rebuilds W + ΔW in backward, the kernel terms and mask that rebuild
    computed, handed on to the gradient so the kernel is built once per backward, not twice."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.selection: TopSelection | None = None
        self.rebuilt: tuple[KernelTerms, torch.Tensor | None] | None = None

    def sparse(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` (owned: overwritten) with the dropped entries zeroed; the selection is made on first use."""
        magnitude = value.abs()
        if self.selection is None:
            self.selection = select_largest(magnitude, self.budget)
        mask = self.selection.mask(magnitude, in_place=True)
        return value if mask is None else value.mul_(mask)

    def terms_and_mask(self, in_pieces: torch.Tensor, out_pieces: torch.Tensor, mixture: torch.Tensor | None
                       ) -> tuple[KernelTerms, torch.Tensor | None]:
        """The kernel terms again, bit for bit, and the mask of the entries the forward kept."""
        terms = kernel_terms(in_pieces, out_pieces, mixture)
        return terms, self.selection.mask(terms.value.abs(), in_place=True)

    def rebuild(self, in_pieces: torch.Tensor, out_pieces: torch.Tensor, mixture: torch.Tensor | None) -> torch.Tensor:
        """ΔW again, bit for bit, keeping its terms and mask for :meth:`SparseKernel.backward`."""
        terms, mask = self.terms_and_mask(in_pieces, out_pieces, mixture)
        self.rebuilt = (terms._replace(value=None), mask)  # the gradient needs the mask, not the value
        if mask is None:
            return terms.value
        # the kernel itself stays in the terms; only the mixture's value may be overwritten
        return terms.value * mask if terms.value is terms.kernel else terms.value.mul_(mask)

    def take_rebuilt(self, *factors: torch.Tensor | None) -> tuple[KernelTerms, torch.Tensor | None]:
        """What :meth:`rebuild` kept (handed over once), or the same computed afresh."""
        rebuilt, self.rebuilt = self.rebuilt, None
        if rebuilt is None:
            terms, mask = self.terms_and_mask(*factors)
            rebuilt = terms._replace(value=None), mask
        return rebuilt


class SparseKernel(torch.autograd.Function):
    """ΔW = the kernel of the factors with all but the ``budget`` largest-magnitude entries zeroed.

    The backward is written out: it rebuilds the kernel from the factors (nothing (out, in)-sized is kept
    between forward and backward), finds the kept entries again from the saved threshold (no second top-k),
    and differentiates the mixture and the distances in closed form; with G the gradient on the kept entries
    pushed through the mixture and Wₚ = αₚ G / Dₚ,
    ∂L/∂outₚ[j] = outₚ[j] Σᵢ Wₚ[j, i] − Σᵢ Wₚ[j, i] inₚ[i] and ∂L/∂inₚ[i] = inₚ[i] Σⱼ Wₚ[j, i] − Σⱼ Wₚ[j, i] outₚ[j].
    """

    @staticmethod
    def forward(ctx, state: DeltaState, in_pieces: torch.Tensor, out_pieces: torch.Tensor,
                mixture: torch.Tensor | None) -> torch.Tensor:
        ctx.state = state
        ctx.save_for_backward(in_pieces, out_pieces, mixture)
        return state.sparse(kernel_value(in_pieces, out_pieces, mixture))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        in_pieces, out_pieces, mixture = ctx.saved_tensors
        (distances, kernel, centred, _), mask = ctx.state.take_rebuilt(in_pieces, out_pieces, mixture)
        # the buffers above are this backward's own: overwritten as they are used up
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(kernel.dtype)
            kept = grad if mask is None else torch.mul(grad, mask, out=mask)
            grad_mixture = None
            if mixture is not None:
                scale, temperature = mixture[0], mixture[1]
                grad_scale = torch.vdot(kept.flatten(), centred.flatten())
                grad_shift = kept.sum() / kept.shape[1]
                softmax = centred.add_(1 / kept.shape[0])
                grad_logits = softmax.mul_(kept - (softmax * kept).sum(0, keepdim=True)).mul_(scale)  # ∂L/∂(K/γ)
                grad_temperature = -torch.vdot(grad_logits.flatten(), kernel.flatten()) / temperature.square()
                del kernel
                kept = grad_logits.div_(temperature).add_(kept)
                grad_mixture = torch.stack([grad_scale, grad_temperature, grad_shift])
            floor = distances.new_tensor(SQUARED_DISTANCE_FLOOR).sqrt()
            clamped = (distances - floor).sign_() if distances.amin() <= floor else None  # 0 where D² was clamped
            weighted = torch.div(kept, distances, out=distances).mul_(distances.new_tensor(PIECE_WEIGHTS).view(-1, 1, 1))
            if clamped is not None:  # no gradient flows where D² was clamped
                weighted.mul_(clamped)
            grad_out = out_pieces * weighted.sum(-1, keepdim=True) - torch.bmm(weighted, in_pieces)
            # (outᵀ W)ᵀ rather than Wᵀ out: the matmul then reads W in its own layout (2x faster on CPU)
            grad_in = in_pieces * weighted.sum(-2).unsqueeze(-1) - torch.bmm(out_pieces.transpose(-1, -2), weighted).transpose(-1, -2)
        needs = ctx.needs_input_grad
        return (None, grad_in if needs[1] else None, grad_out if needs[2] else None,
                grad_mixture if needs[3] else None)


class LinearKernelDelta(torch.autograd.Function):
    """y = x · ΔWᵀ where ΔW = build(*factors) is rebuilt in backward instead of being saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, build: Callable[..., torch.Tensor], *factors: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            delta = build(*factors)
        ctx.build = build
        ctx.save_for_backward(x, *factors)
        return F.linear(x, delta.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, *factors = ctx.saved_tensors
        leaves = [f.detach().requires_grad_(needs) for f, needs in zip(factors, ctx.needs_input_grad[2:])]
        with torch.enable_grad():
            delta = ctx.build(*leaves)
        grad_x = grad_out @ delta.detach().to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        trainable = [leaf for leaf in leaves if leaf.requires_grad]
        grads = {}
        if trainable and delta.requires_grad:
            flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
            grad_delta = (flat_grad.t() @ x.reshape(-1, x.shape[-1]).to(flat_grad.dtype)).to(delta.dtype)
            found = torch.autograd.grad(delta, trainable, grad_delta, allow_unused=True)
            grads = {id(leaf): g for leaf, g in zip(trainable, found)}
        return (grad_x, None, *(grads.get(id(leaf)) for leaf in leaves))


def traced_top_mask(magnitude: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """The mask :func:`select_largest` gives (the ``budget`` largest entries, ties at the threshold kept in flat
    order), from tensor operations only: no host sync and no branch on a value, so ``torch.compile`` traces it
    into one graph, and a ``budget`` tensor (SNELLA's buffer) that changes does not recompile it."""
    flat = magnitude.flatten()
    descending = flat.sort(descending=True).values
    threshold = descending.index_select(0, (budget - 1).clamp(0, flat.numel() - 1).view(1))  # the budget-th largest
    above = flat > threshold
    tied = flat == threshold
    kept = above | (tied & (tied.cumsum(0) <= budget - above.sum()))
    return kept.to(magnitude.dtype).view_as(magnitude)


def traced_sparse_kernel(budget: torch.Tensor, in_pieces: torch.Tensor, out_pieces: torch.Tensor,
                         mixture: torch.Tensor | None = None) -> torch.Tensor:
    """:class:`SparseKernel`'s ΔW as stock differentiable operations, for ``torch.compile`` (which decides itself
    what the backward keeps or recomputes): the same values, the same gradient."""
    value = traced_kernel_value(in_pieces, out_pieces, mixture)
    with torch.no_grad():
        mask = traced_top_mask(value.abs(), budget)
    return value * mask
