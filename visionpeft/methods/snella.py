"""SNELLA (arXiv 2510.24037) and SNELL (Shen et al., NeurIPS 2024): kernelized sparse tuning.

Two low-rank factors, each split into P = 2 pieces of rank r/2 (``in_pieces`` (P, fan_in, r/2) and
``out_pieces`` (P, out, r/2); r·(in + out) parameters, as LoRA-r), are merged through a non-linear
kernel into a full-rank matrix K (out × fan_in):

    distance:          K[j, i] = Σ_p α_p ‖out_p[j] − in_p[i]‖₂,  α = (+0.1, −0.1) fixed (as the reference code)
    distance+softmax:  K' = K + a · (softmax_j(K / γ) − 1/out) + β / fan_in,  a, γ, β trainable (init 1, 1, 0)

and only the ``budget`` largest-magnitude entries of K (or K') survive (competition inside a layer):
ΔW = K ⊙ 1[top-budget |K|]. SNELLA re-allocates the budgets across layers during training
(competition across layers, :meth:`SNELLA.model_step`); SNELL (``"snell"``) keeps every layer at
``density`` with the plain distance kernel.

Choices that differ from the reference code (``shared/methods/flora_snella.md`` §2-3, §6):

* **Exact zero start.** The reference draws the two pieces independently, so K starts small but not zero.
  Here both pieces start identical (in_1 = in_2, out_1 = out_2, Kaiming-uniform as the reference): with
  α = (+0.1, −0.1) the two distances cancel exactly, so K = 0 and attaching changes nothing, bit for bit.
  The dynamics survive: the gradients of the two pieces are exact opposites (α₁ = −α₂), so the pieces
  separate from the first step and K becomes full-rank. The softmax term is centred (the uniform 1/out
  subtracted, computed as (e − mean e)/Σe, which is exactly 0 when K = 0) and β starts at 0.
  ``benchmarks/snella.py --init-compare`` trains both starts side by side.
* **Shift per input mean.** The reference adds β to every entry, i.e. β·Σᵢxᵢ to every output; here β/fan_in,
  i.e. β·meanᵢ(xᵢ), so the shift's effect (and its Adam step) does not grow with the layer's width, and the
  cancellation in β·Σᵢxᵢ (inputs after a norm are near zero-mean) does not amplify merge round-off.
* **Plain hard threshold, no magnitude re-weighting.** The reference multiplies the kept entries by a
  detached |K| (so ΔW = K·|K| and dΔW/dK = |K|). At an exact zero start that gradient is exactly zero and
  nothing would ever train, so ΔW = K on the kept entries (gradient 1 there, 0 elsewhere). Dropped
  entries re-enter through the shared factors. Consequence: the reference's learning rates do not carry
  over (its updates are quadratic in K, these are linear).
* **Threshold by an exact selection** (:func:`select_largest`: the budget-th largest magnitude, ties at it
  broken in flat order), which keeps exactly ``budget`` entries even with ties and works past torch.quantile's
  2^24 limit; the backward finds the same entries from the saved threshold.
* **Budgets are integer counts** (a persistent int64 buffer ``budget``, saved with the adapter), so the
  global target holds exactly: at the end of the schedule Σ budget = ⌊density · Σ numel⌋.

Schedule (SNELLA): call ``vp.step(model, step, total_steps)`` after every ``optimizer.step()`` and *before*
``zero_grad()`` — the importance needs the gradients. ``step`` counts optimizer steps (1..total_steps);
``warmup`` and ``final`` are fractions of ``total_steps``, ``interval`` is in steps. Every call updates the
importance EMAs of |θ·∇θ| over both factors (sensitivity Ī, uncertainty Ū = EMA |I − Ī|; layer score =
mean(Ī·Ū) over ``in_pieces`` + the same over ``out_pieces``). The global budget stays at ``init_density``
during the warm-up, decays cubically to ``density``, and is held there in the final phase; budgets are
re-allocated proportionally to the scores at every step of the decay that is a multiple of ``interval``
(``step % interval == 0``, the last step of the decay included) and at every step of the final phase after
it, as the reference's schedule (:func:`reallocation_budget`). (The reference calls its allocator once per
epoch; here the units are the caller's steps.)

Memory and paths (``path``): nothing (out, in)-sized is kept between forward and backward. ΔW comes from
:class:`_SparseKernel`, which saves the factors and the top-k threshold; its backward rebuilds the kernel and
differentiates it in closed form (no autograd graph over (out, in) intermediates, no second top-k). The
kept entries are found by a radix select on the magnitudes' float bits (:func:`select_largest`), and masks are
float, not boolean (``torch.where`` on a boolean mask cost 1.7 ms on fc1's 1536 × 384 on CPU, a multiply 0.1).
``"weight"`` (default) runs the op with W + ΔW; the op keeps the factors, not W + ΔW, for backward
(``layers.kinds.rebuilt_on_backward``), and that rebuild hands its kernel terms on to the gradient, so the
kernel is built once in forward and once in backward. That is one matmul more than the frozen layer (the
gradient of W + ΔW), as full fine-tuning. ``"activation"`` adds x·ΔWᵀ to the base output (a custom autograd
function on linear ops, non-reentrant checkpointing on convs): three matmuls more; it is the only path that
can drop the adapter's input, so dropout always uses it. Grouped convs without dropout, MultiheadAttention,
fused q/k/v blocks and generic modules always run as W + ΔW. Measured on ViT-S/16 fc1 (1576 tokens,
384 → 1536, 2 CPU threads), forward + backward: frozen 58 ms, LoRA 67, full fine-tuning 94, SNELLA 117
(was 171 with autograd through the kernel and a second top-k), activation path 188.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionpeft.layers.kinds import Slot, rebuildable
from visionpeft.methods.base import Method, Option, adapter_dtype, positive_int, probability, register

#: α_p of the distance kernel's two pieces (constants in the reference code); opposite signs are what
#: makes identical pieces an exact zero start
PIECE_WEIGHTS = (0.1, -0.1)


# --- kernels ---------------------------------------------------------------------------------------
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
    K is. Like every kernel function here it works in place and is not for autograd: :class:`_SparseKernel`
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


# --- the sparsifier ---------------------------------------------------------------------------------
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
    the budget-th largest, and only that bucket is searched. 2.5x faster than ``topk`` at ViT-S's fc1 size on
    CPU, and not subject to torch.quantile's 2^24 limit."""
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
    return _DeltaState(budget).sparse(kernel.clone())


KERNELS = ("distance", "distance+softmax")
PATHS = ("activation", "weight")


# --- the budget schedule -------------------------------------------------------------------------
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


# --- option checks -------------------------------------------------------------------------------
def _even_rank(value: Any) -> bool:
    return positive_int(value) and value % 2 == 0


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


def _betas(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(probability(b) for b in value)


class _DeltaState:
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
        """ΔW again, bit for bit, keeping its terms and mask for :meth:`_SparseKernel.backward`."""
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


class _SparseKernel(torch.autograd.Function):
    """ΔW = the kernel of the factors with all but the ``budget`` largest-magnitude entries zeroed.

    The backward is written out: it rebuilds the kernel from the factors (nothing (out, in)-sized is kept
    between forward and backward), finds the kept entries again from the saved threshold (no second top-k),
    and differentiates the mixture and the distances in closed form; with G the gradient on the kept entries
    pushed through the mixture and Wₚ = αₚ G / Dₚ,
    ∂L/∂outₚ[j] = outₚ[j] Σᵢ Wₚ[j, i] − Σᵢ Wₚ[j, i] inₚ[i] and ∂L/∂inₚ[i] = inₚ[i] Σⱼ Wₚ[j, i] − Σⱼ Wₚ[j, i] outₚ[j].
    """

    @staticmethod
    def forward(ctx, state: _DeltaState, in_pieces: torch.Tensor, out_pieces: torch.Tensor,
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


class _LinearKernelDelta(torch.autograd.Function):
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


@register
class SNELLA(Method):
    name = "snella"
    split_fused = True
    #: whether :meth:`model_step` re-allocates the per-layer budgets (SNELL keeps them fixed)
    allocates = True
    options = {
        "rank": Option(8, _even_rank, "an even int >= 2", "rank of the factors (two pieces of rank/2)"),
        "density": Option(0.5, _fraction, "a number in (0, 1]",
                          "final fraction of the targeted entries that may be non-zero (1 - the reference's sparsity)"),
        "init_density": Option(1.0, _fraction, "a number in (0, 1], >= density", "global density before the decay"),
        "warmup": Option(0.1, probability, "a float in [0, 1)", "fraction of total_steps kept at init_density"),
        "final": Option(0.1, probability, "a float in [0, 1)", "fraction of total_steps held at density at the end"),
        "interval": Option(10, positive_int, "an int >= 1", "steps between re-allocations during the decay"),
        "betas": Option((0.85, 0.85), _betas, "two floats in [0, 1)", "EMA factors of sensitivity and uncertainty"),
        "kernel": Option("distance+softmax", lambda v: v in KERNELS, " or ".join(map(repr, KERNELS)),
                         "merge of the factors: distance, or distance plus SNELLA's softmax mixture"),
        "dropout": Option(0.0, probability, "a float in [0, 1)", "dropout on the adapter's input"),
        "path": Option("weight", lambda v: v in PATHS, " or ".join(map(repr, PATHS)),
                       "linear/conv forward: the op with W + ΔW (W + ΔW rebuilt in backward), or x·ΔWᵀ added to "
                       "the output (two more matmuls; always used with dropout)"),
    }

    def __init__(self, slot: Slot, rank: int, density: float, init_density: float, warmup: float, final: float,
                 interval: int, betas: Sequence[float], kernel: str, dropout: float, path: str) -> None:
        super().__init__(slot, rank=rank, density=density, init_density=init_density, warmup=warmup, final=final,
                         interval=interval, betas=tuple(betas), kernel=kernel, dropout=dropout, path=path)
        self.path = path
        dtype = adapter_dtype(slot.dtype)
        half = rank // 2
        pieces = len(PIECE_WEIGHTS)
        # identical pieces: the two distances cancel exactly (module docstring, "Exact zero start")
        in_piece = nn.init.uniform_(torch.empty(slot.in_features, half, dtype=dtype, device=slot.device),
                                    -1 / math.sqrt(slot.in_features * half), 1 / math.sqrt(slot.in_features * half))
        out_piece = nn.init.uniform_(torch.empty(slot.out_features, half, dtype=dtype, device=slot.device),
                                     -1 / math.sqrt(slot.out_features * half), 1 / math.sqrt(slot.out_features * half))
        self.in_pieces = nn.Parameter(in_piece.expand(pieces, -1, -1).clone())
        self.out_pieces = nn.Parameter(out_piece.expand(pieces, -1, -1).clone())
        # (scale a, temperature γ, shift β) of the softmax mixture
        self.mixture = nn.Parameter(torch.tensor([1.0, 1.0, 0.0], dtype=dtype, device=slot.device)) \
            if kernel == "distance+softmax" else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.numel = slot.out_features * slot.in_features
        self._budget = min(self.numel, math.floor(init_density * self.numel))
        self.register_buffer("budget", torch.tensor(self._budget, dtype=torch.int64, device=slot.device))
        if self.allocates:  # importance EMAs: training state, not saved
            for name in ("sensitivity_in", "uncertainty_in"):
                self.register_buffer(name, torch.zeros_like(self.in_pieces), persistent=False)
            for name in ("sensitivity_out", "uncertainty_out"):
                self.register_buffer(name, torch.zeros_like(self.out_pieces), persistent=False)

    @classmethod
    def prepare(cls, slots, options):
        if cls.allocates:
            cls._check_schedule(options)
        return super().prepare(slots, options)

    @classmethod
    def _check_schedule(cls, options: dict[str, Any]) -> None:
        if options["init_density"] < options["density"]:
            raise ValueError(f"{cls.name}: init_density={options['init_density']!r} is below "
                             f"density={options['density']!r}; allowed: init_density >= density (the budget only shrinks)")
        if options["warmup"] + options["final"] >= 1:
            raise ValueError(f"{cls.name}: warmup={options['warmup']!r} + final={options['final']!r} leaves no decay phase; "
                             f"allowed: warmup + final < 1")

    # --- the delta -------------------------------------------------------------------------------
    def _factors(self) -> tuple[torch.Tensor, ...]:
        return (self.in_pieces, self.out_pieces) if self.mixture is None else (self.in_pieces, self.out_pieces, self.mixture)

    def _builder(self) -> Callable[..., torch.Tensor]:
        """A function of the factors giving ΔW (out, fan_in), differentiable through :class:`_SparseKernel`;
        the budget is fixed now, and the kept entries are chosen on its first call and reused after."""
        state = _DeltaState(self._budget)

        def build(in_pieces: torch.Tensor, out_pieces: torch.Tensor, mixture: torch.Tensor | None = None) -> torch.Tensor:
            return _SparseKernel.apply(state, in_pieces, out_pieces, mixture)

        build.state = state
        return build

    def delta(self) -> torch.Tensor:
        return self._builder()(*self._factors()).view(self.slot_shape)

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return weight + self.delta().to(weight.dtype)
        build, factors, shape = self._builder(), self._factors(), self.slot_shape
        effective = weight + build(*factors).view(shape).to(weight.dtype)
        # the op keeps the factors, not W + ΔW, for its backward (layers.kinds.rebuilt_on_backward); the
        # rebuild hands its kernel terms on to _SparseKernel.backward
        frozen = [f.detach() for f in factors] + [None] * (3 - len(factors))
        return rebuildable(effective, weight, lambda base: base + build.state.rebuild(*frozen).view(shape).to(base.dtype))

    def uses_activation_path(self, slot: Slot) -> bool:
        if slot.op not in ("linear", "conv"):
            return False
        if self.dropout is not None:  # only the activation path can drop the adapter's input
            return True
        # a grouped conv's W + ΔW is small
        return self.path == "activation" and (slot.op == "linear" or slot.groups == 1)

    def add_output_delta(self, x: torch.Tensor, out: torch.Tensor, slot: Slot) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        build = self._builder()
        if slot.op == "linear":
            return out.add_(_LinearKernelDelta.apply(x, build, *self._factors()).to(out.dtype))
        shape = self.slot_shape

        def conv(x: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
            return slot.run(x, build(*factors).view(shape).to(x.dtype))

        if not torch.is_grad_enabled():
            return out.add_(conv(x, *self._factors()).to(out.dtype))
        return out.add_(checkpoint(conv, x, *self._factors(), use_reentrant=False).to(out.dtype))

    # --- sparsity --------------------------------------------------------------------------------
    @property
    def current_density(self) -> float:
        """Fraction of this slot's entries allowed to be non-zero now."""
        return self._budget / self.numel

    def set_budget(self, budget: int) -> None:
        self._budget = int(budget)
        self.budget.fill_(self._budget)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._budget = int(self.budget)  # the forward reads a Python int: no device sync per call

    @torch.no_grad()
    def update_importance(self, betas: Sequence[float]) -> None:
        """One EMA step of sensitivity |θ·∇θ| and its uncertainty, for both factors (skipped without grads)."""
        beta1, beta2 = betas
        for param, sensitivity, uncertainty in ((self.in_pieces, self.sensitivity_in, self.uncertainty_in),
                                                (self.out_pieces, self.sensitivity_out, self.uncertainty_out)):
            if param.grad is None:
                continue
            current = (param * param.grad).abs().nan_to_num_(0.0, 0.0, 0.0)
            sensitivity.mul_(beta1).add_(current, alpha=1 - beta1)
            uncertainty.mul_(beta2).add_((current - sensitivity).abs_(), alpha=1 - beta2)

    def importance(self) -> torch.Tensor:
        """Layer score: mean sensitivity × uncertainty over each factor, summed (a 0-dim tensor)."""
        return (self.sensitivity_in * self.uncertainty_in).mean() + (self.sensitivity_out * self.uncertainty_out).mean()

    @classmethod
    def model_step(cls, instances: Sequence["SNELLA"], step: int, total_steps: int) -> None:
        """Update every layer's importance; re-allocate the global budget when the schedule says so.

        Must run after ``optimizer.step()`` and before ``zero_grad()`` (the importance reads the gradients).
        """
        if not cls.allocates or not instances:
            return
        config = instances[0].config
        for method in instances:
            method.update_importance(config["betas"])
        capacities = [m.numel for m in instances]
        initial = sum(min(n, math.floor(config["init_density"] * n)) for n in capacities)
        target = math.floor(config["density"] * sum(capacities))
        budget = reallocation_budget(step, total_steps, initial, target, config["warmup"], config["final"],
                                     config["interval"])
        if budget is None:
            return
        device = instances[0].budget.device
        scores = torch.stack([m.importance().to(device) for m in instances]).tolist()  # one sync, not one per layer
        for method, count in zip(instances, allocate(budget, scores, capacities)):
            method.set_budget(count)

    def extra_repr(self) -> str:
        return (f"rank={self.config['rank']}, kernel={self.config['kernel']}, "
                f"density={self.current_density:.3f} (target {self.config['density']})")


@register
class SNELL(SNELLA):
    """SNELL: the distance kernel at a fixed ``density`` in every layer (no allocation, no schedule)."""

    name = "snell"
    allocates = False
    options = {key: SNELLA.options[key] for key in ("rank", "density", "dropout", "path")}

    def __init__(self, slot: Slot, rank: int, density: float, dropout: float, path: str) -> None:
        super().__init__(slot, rank=rank, density=density, init_density=density, warmup=0.0, final=0.0, interval=1,
                         betas=(0.85, 0.85), kernel="distance", dropout=dropout, path=path)
        self.config = dict(rank=rank, density=density, dropout=dropout, path=path)

    def extra_repr(self) -> str:
        return f"rank={self.config['rank']}, kernel=distance, density={self.current_density:.3f}"
