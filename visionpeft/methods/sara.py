"""SaRA (Hu et al., ICLR 2025): train the pretrained weights that are too small to matter.

Selection. One global magnitude threshold θ over every targeted tensor: the entries with ``|W0| < θ``
(strict, as in the paper) train, everything else stays frozen. Give exactly one of ``threshold`` (θ
itself), ``density`` (fraction of all targeted entries) or ``budget`` (number of entries); with none,
``density=0.05``, so a call works on a model of any weight scale. For density/budget θ is the (k+1)-th
smallest magnitude of all targeted entries, found exactly by a radix select on the magnitudes' bit
patterns, one tensor at a time (``sara_select``; no copy of all the weights, unlike a global ``kthvalue``;
``torch.quantile`` refuses more than 2^24 entries). Magnitudes are compared in float32, or in float64 when
a targeted weight is float64 (every magnitude exact, so no rounding moves an entry across θ), and exactly
k entries train unless magnitudes tie at θ (then fewer). ``targets="all"`` selects every parameter tensor
(biases, norms, embeddings), as the paper does for UNets.

Parameterization. Per slot: ``indices`` (flat positions into the canonical weight, int32 below 2^31
entries, sorted; no weight-sized mask is kept), ``original = W0[indices]`` and the trainable leaf
``values``, initialised to ``original`` (not to zero, and not to ``|original|`` as the released code writes).
The layer runs with ``W0 + scatter(values − original)``, rebuilt every forward, so attaching is bit-exact,
the delta for merge/unmerge/``scale`` is ``scatter(values − original)``, and ``values`` is an ordinary
leaf: gradient accumulation, clipping, DDP/FSDP and ``model.parameters()`` all see it.

Sparse backprop (``sara_backprop``). No base weight ever gets a ``.grad`` and the optimizer state is
nnz-sized. Paths:

* ``"weight"`` (every layer kind): a custom autograd function copies W and index-adds the value change
  in forward; backward returns only the gathered gradient ``dW[indices]`` (the dense dW of one layer
  exists transiently inside that layer's backward, as in the reference). The op does not keep the
  weight-sized copy for backward: it saves a recipe and rebuilds the copy when backward needs it
  (``layers.kinds.rebuilt_on_backward``; a clone and an index_add, cheap next to the matmuls).
* ``"sampled"`` (linear ops and ungrouped zero-padded 2-D convs, where SaRA is the only adapter on the
  weight): the op runs with W + ΔW as a constant, so it computes no weight gradient, and an output tap
  (``SampledGradientTap``) computes only the selected entries ``dW[i, j] = Σ_t g[t, i] · x[t, j]``
  (``layers.sampled``: a gather-dot compiled by inductor, nothing entries × tokens materialized; a conv's
  x is its unfolded input, one batch chunk at a time).
* ``"sparse"`` (linear ops, float32/64): the base op runs unchanged and the change is added to its
  output as ``x · ΔWᵀ`` with ΔW a CSR matrix; backward computes the selected entries of dW with
  ``torch.sparse.sampled_addmm`` and ``g · ΔW`` sparsely. No weight-sized tensor is built, kept or returned.
* ``"auto"`` (default): sampled where it applies and the layer trains at most ``SAMPLED_MAX_DENSITY``
  (10 %) of its entries, weight everywhere else.

Why these defaults (``python benchmarks/sara.py --backprop`` measures the three paths on one layer;
``benchmarks/README.md`` has the numbers): the sampled gradient beats the dense dW when a layer trains a
small fraction of its entries and loses when it trains a large one, hence the 10 % bound of ``"auto"``;
torch's CSR products are no faster than the dense dW they avoid (they also run the base op's own backward
for x), so ``"sparse"`` is opt-in (worth measuring on GPUs).

Rank penalty. ``visionpeft.regularization`` returns ``lambda_rank · ‖W_M‖_*`` (``W_M``: the values of the
entries still training scattered into a zero matrix, so entries frozen by re-selection count as 0, as the
reference's ``param * current_mask``; float32 ``torch.linalg.svdvals``, gradient to ``values``) for ONE
layer drawn uniformly per call (torch's RNG) among the 2-D slots with ``min(out, in) > 64``. As in the
reference, a drawn layer with 100 or fewer entries still training adds nothing that call (checked at each
draw, so a layer can drop out after re-selection). ``lambda_rank`` defaults to 5e-4, the released recipe; the
paper's appendix says 5e-3.

Progressive re-selection. ``visionpeft.step(model, step, total)`` at the first ``step >= progressive_at ·
total`` (default 0.5; 1.0 disables) freezes the entries whose current value has grown to ``|v| >= θ``:
their learned values are copied to ``frozen_values`` and the forward uses that copy from then on, so
they get zero gradient and anything the optimizer still does to them (momentum, weight decay) has no
effect. ``values`` keeps its size, so the optimizer and its state for the surviving entries carry on
unchanged (the released optimizer rebuilds itself, resets its moments and skips that step's update).
The state is saved with the adapter (``frozen``, ``frozen_values``, ``reselected``).

Saving. ``indices``, ``values``, ``original``, θ and a fingerprint of the whole base tensor (float64
sums, absolute sums and squared sums over 8 contiguous chunks) are saved; loading onto a base whose
fingerprint differs (relative 1e-3) raises ValueError before the model is touched.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from visionpeft.distributed import full_tensor
from visionpeft.layers.kinds import Slot, rebuildable
from visionpeft.methods.base import Method, Option, adapter_dtype, positive_int, register
from visionpeft.methods.sara_backprop import (SampledGradientTap, ScatterAdd, SparseLinearDelta, csr_structure,
                                              scatter_add_copy)
from visionpeft.methods.sara_select import global_threshold, magnitudes, selection_dtype

DEFAULT_DENSITY = 0.05
_RANK_MIN_SIZE = 64
_RANK_MIN_ENTRIES = 100
_FINGERPRINT_CHUNKS = 8
_FINGERPRINT_TOLERANCE = 1e-3


def _positive_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)


def _fraction_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1)


def _non_negative(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


PATHS = ("auto", "weight", "sampled", "sparse")
#: the largest fraction of a layer's entries at which ``path="auto"`` takes the sampled gradient: below it the
#: gather-dot beats the dense gᵀx, well above it it loses (``benchmarks/sara.py --backprop``)
SAMPLED_MAX_DENSITY = 0.1


def _path(value: Any) -> bool:
    return value in PATHS


def fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """(3, chunks) float64: sum, absolute sum and squared sum of 8 contiguous chunks of the flat weight."""
    chunks = weight.detach().reshape(-1).double().tensor_split(_FINGERPRINT_CHUNKS)
    return torch.stack([torch.stack([c.sum(), c.abs().sum(), c.square().sum()]) for c in chunks], dim=1)


@register
class SaRA(Method):
    name = "sara"
    #: q, k and v of a fused projection are separate matrices for the rank penalty (as diffusers' to_q/k/v)
    split_fused = True
    options = {
        "threshold": Option(None, _positive_or_none, "a number > 0, or None",
                            "θ: train the entries with |W0| < θ (give one of threshold/density/budget)"),
        "density": Option(None, _fraction_or_none, "a number in (0, 1], or None",
                          f"fraction of all targeted entries to train (default {DEFAULT_DENSITY} when no other is given)"),
        "budget": Option(None, lambda v: v is None or positive_int(v), "an int >= 1, or None",
                         "number of entries to train"),
        "lambda_rank": Option(5e-4, _non_negative, "a number >= 0",
                              "weight of the nuclear-norm penalty (release: 5e-4; paper appendix: 5e-3)"),
        "progressive_at": Option(0.5, _fraction, "a number in (0, 1]",
                                 "fraction of training after which grown entries freeze; 1.0 disables"),
        "path": Option("auto", _path, " or ".join(map(repr, PATHS)),
                       "'weight': the op runs with W + ΔW and the values' gradient is gathered from the dense dW; "
                       "'sampled' (linear ops, ungrouped 2-D convs): only the selected entries of dW are computed; "
                       f"'auto': sampled where it applies and <= {SAMPLED_MAX_DENSITY:.0%} of the entries train, "
                       "weight elsewhere; "
                       "'sparse' (linear ops): x·ΔWᵀ added with CSR products"),
    }

    def __init__(self, slot: Slot, threshold: float | None, density: float | None, budget: int | None,
                 lambda_rank: float, progressive_at: float, path: str, selection: dict[str, Any] | None = None) -> None:
        super().__init__(slot, threshold=threshold, density=density, budget=budget, lambda_rank=lambda_rank,
                         progressive_at=progressive_at, path=path)
        if selection is None:
            raise ValueError("sara needs the selected entries (built by SaRA.prepare)")
        index_dtype = torch.int32 if math.prod(slot.shape) < 2**31 else torch.int64
        self.register_buffer("indices", selection["indices"].to(index_dtype))
        self.register_buffer("original", selection["original"].clone())
        self.values = nn.Parameter(selection["original"].to(adapter_dtype(slot.dtype)).clone())
        self.register_buffer("theta", torch.tensor(selection["theta"], dtype=torch.float64))
        self.register_buffer("fingerprint", selection["fingerprint"])
        self.progressive = progressive_at < 1.0
        if self.progressive:
            self.register_buffer("frozen", torch.zeros_like(self.values, dtype=torch.bool))
            self.register_buffer("frozen_values", torch.zeros_like(self.values))
            self.register_buffer("reselected", torch.tensor(False))
        self.lambda_rank = lambda_rank
        self.progressive_at = progressive_at
        self.path = path
        # the shape rule is fixed; the entry count is checked at each draw (model_penalty)
        self.rank_eligible = len(slot.shape) == 2 and min(slot.shape) > _RANK_MIN_SIZE
        self._csr_structure: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- selection ---------------------------------------------------------------------------
    @classmethod
    def prepare(cls, slots, options):
        given = [k for k in ("threshold", "density", "budget") if options[k] is not None]
        if len(given) > 1:
            raise ValueError(f"sara: give exactly one of threshold, density or budget; got {', '.join(given)}")
        weights = [w for _, _, w in slots]
        total = sum(w.numel() for w in weights)
        if options["threshold"] is not None:
            theta = float(options["threshold"])
        else:
            if options["budget"] is not None:
                keep = options["budget"]
                if keep > total:
                    raise ValueError(f"sara: budget={keep} exceeds the {total} targeted entries")
            else:
                density = options["density"] if options["density"] is not None else DEFAULT_DENSITY
                keep = max(1, round(density * total))
            theta = global_threshold(weights, keep)
        per_slot = []
        dtype = selection_dtype(weights)
        for _, _, weight in slots:
            flat = weight.detach().reshape(-1)
            indices = (magnitudes(weight, dtype) < theta).nonzero().squeeze(1)
            per_slot.append(dict(options, selection={
                "indices": indices, "original": flat[indices], "theta": theta, "fingerprint": fingerprint(weight)}))
        return per_slot

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        where = prefix.rstrip(".")
        saved = state_dict.get(prefix + "fingerprint")
        if saved is not None and saved.shape == self.fingerprint.shape:
            scale = self.fingerprint[[1, 1, 2]].clamp_min(1e-300)  # sums compare to absolute sums
            gap = ((saved.to(self.fingerprint) - self.fingerprint).abs() / scale).max().item()
            if gap > _FINGERPRINT_TOLERANCE:
                raise ValueError(f"sara adapter {where!r} was trained on other base weights (fingerprint differs by "
                                 f"{gap:.2e} relative); load it onto the model it was trained from")
        indices = state_dict.get(prefix + "indices")
        if indices is not None and indices.numel():
            size = math.prod(self.slot_shape)
            if indices.min() < 0 or indices.max() >= size or (indices.numel() > 1 and (indices.diff() <= 0).any()):
                raise ValueError(f"sara adapter {where!r}: indices must be increasing positions in [0, {size})")
        self._csr_structure = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- the delta ---------------------------------------------------------------------------
    def current_values(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """The value of every selected entry (of ``values``, default the trained ones), frozen ones at what they
        were when they froze."""
        values = self.values if values is None else values
        if self.progressive:
            return torch.where(self.frozen, self.frozen_values, values)
        return values

    def value_change(self) -> torch.Tensor:
        return self.current_values() - self.original.to(self.values.dtype)

    def delta(self) -> torch.Tensor:
        change = self.value_change()
        dense = torch.zeros(math.prod(self.slot_shape), dtype=change.dtype, device=change.device)
        return dense.index_add(0, self.indices, change).view(self.slot_shape)

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        change = self.value_change().to(weight.dtype)
        effective = ScatterAdd.apply(weight, change, self.indices)
        # the op saves a recipe instead of this weight-sized copy (layers.kinds.rebuilt_on_backward)
        frozen_change, index = change.detach(), self.indices
        return rebuildable(effective, weight, lambda base: scatter_add_copy(base, frozen_change, index))

    def uses_activation_path(self, slot: Slot) -> bool:
        return self.path == "sparse" and slot.op == "linear" and slot.dtype in (torch.float32, torch.float64)

    def gradient_from_output(self, slot: Slot) -> bool:
        conv2d = slot.op == "conv" and len(slot.shape) == 4 and slot.groups == 1 and slot.padding_mode == "zeros"
        if not (slot.op == "linear" or conv2d) or self.path not in ("auto", "sampled"):
            return False
        return self.path == "sampled" or self.values.numel() <= SAMPLED_MAX_DENSITY * math.prod(self.slot_shape)

    def tap_output(self, x: torch.Tensor, out: torch.Tensor, slot: Slot, rows: slice) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.values.requires_grad):
            return out
        frozen = self.frozen if self.progressive else None
        return SampledGradientTap.apply(out, x, self.values, self.indices, frozen, slot, rows)

    def add_output_delta(self, x: torch.Tensor, out: torch.Tensor, slot: Slot) -> torch.Tensor:
        crow, col = self._csr()
        rows = x.reshape(-1, x.shape[-1])
        change = SparseLinearDelta.apply(rows, self.value_change().to(x.dtype), crow, col, tuple(self.slot_shape))
        return out.add_(change.reshape(out.shape).to(out.dtype))

    def _csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR row pointers and column indices of the selection (cached; indices are sorted)."""
        if self._csr_structure is None or self._csr_structure[1].device != self.indices.device:
            self._csr_structure = csr_structure(self.indices, self.slot_shape)
        return self._csr_structure

    # --- training hooks ----------------------------------------------------------------------
    def trainable_entries(self) -> int:
        """How many selected entries still train (after a progressive re-selection, fewer than selected)."""
        return self.values.numel() - (int(self.frozen.sum()) if self.progressive else 0)

    def rank_penalty(self) -> torch.Tensor:
        """``lambda_rank · ‖W_M‖_*`` in float32, W_M the values of the entries still training (frozen ones: 0)."""
        values = full_tensor(self.values).float()
        if self.progressive:
            values = values.masked_fill(self.frozen, 0)
        matrix = torch.zeros(math.prod(self.slot_shape), dtype=torch.float32, device=values.device)
        matrix = matrix.index_add(0, self.indices, values).view(self.slot_shape)
        return self.lambda_rank * torch.linalg.svdvals(matrix).sum()

    @classmethod
    def model_penalty(cls, instances):
        eligible = [m for m in instances if m.rank_eligible and m.lambda_rank > 0]
        if not eligible:
            return None
        drawn = eligible[int(torch.randint(len(eligible), ()))]
        return drawn.rank_penalty() if drawn.trainable_entries() > _RANK_MIN_ENTRIES else None

    @torch.no_grad()
    def reselect(self) -> None:
        """Freeze the entries whose value has grown to |v| >= θ, at their current value."""
        if not self.progressive:
            raise ValueError("sara: progressive re-selection is disabled (progressive_at=1.0)")
        current = self.current_values(full_tensor(self.values))  # whole on every rank of an FSDP2 model
        grown = (current.abs() >= self.theta.to(current.dtype)) & ~self.frozen
        self.frozen_values.copy_(torch.where(grown, current, self.frozen_values))
        self.frozen |= grown
        self.reselected.fill_(True)

    @classmethod
    def model_step(cls, instances, step, total_steps):
        for method in instances:
            if method.progressive and not method.reselected and step >= method.progressive_at * total_steps:
                method.reselect()

    def extra_repr(self) -> str:
        return (f"selected={self.values.numel()}, trainable={self.trainable_entries()}, theta={self.theta.item():.3g}, "
                f"lambda_rank={self.lambda_rank}, progressive_at={self.progressive_at}, path={self.path}")
