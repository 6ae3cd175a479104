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

The module holds the method's choices; the kernel math is in ``snella_kernel``, the sparsifier and the
autograd functions in ``snella_sparse``, the budget schedule and its allocation in ``snella_schedule``.

Choices that differ from the reference code (the SNELL repository, ``ssfgunner/SNELL``):

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
* **Threshold by an exact selection** (``snella_sparse.select_largest``: the budget-th largest magnitude, ties at it
  broken in flat order), which keeps exactly ``budget`` entries even with ties and works past torch.quantile's
  2^24 limit; the backward finds the same entries from the saved threshold.
* **Budgets are integer counts** (a persistent int64 buffer ``budget``, saved with the adapter), so the
  global target holds exactly: from the first re-allocation in the final phase (or at the last step of the
  decay) on, Σ budget = ⌊density · Σ numel⌋.

Schedule (SNELLA): call ``vp.step(model, step, total_steps)`` after every ``optimizer.step()`` and *before*
``zero_grad()`` — the importance needs the gradients. ``step`` counts optimizer steps (1..total_steps);
``warmup`` and ``final`` are fractions of ``total_steps``, ``interval`` is in steps. Every call updates the
importance EMAs of |θ·∇θ| over both factors (sensitivity Ī, uncertainty Ū = EMA |I − Ī|; layer score =
mean(Ī·Ū) over ``in_pieces`` + the same over ``out_pieces``). The global budget stays at ``init_density``
during the warm-up, decays cubically to ``density``, and is held there in the final phase; budgets are
re-allocated proportionally to the scores at every step of the decay that is a multiple of ``interval``
(``step % interval == 0``, the last step of the decay included) and at every step of the final phase after
it, as the reference's schedule (``snella_schedule.reallocation_budget``). (The reference calls its allocator once per
epoch; here the units are the caller's steps.)

Memory and paths (``path``): nothing (out, in)-sized is kept between forward and backward. ΔW comes from
:class:`~visionpeft.methods.snella_sparse.SparseKernel`, which saves the factors and the top-k threshold; its
backward rebuilds the kernel and differentiates it in closed form (no autograd graph over (out, in)
intermediates, no second top-k). The kept entries are found by a radix select on the magnitudes' float bits,
and masks are float, not boolean (on CPU a multiply by a float mask is many times faster than ``torch.where``
on a boolean one).
``"weight"`` (default) runs the op with W + ΔW; the op keeps the factors, not W + ΔW, for backward
(``layers.kinds.rebuilt_on_backward``), and that rebuild hands its kernel terms on to the gradient, so the
kernel is built once in forward and once in backward. That is one matmul more than the frozen layer (the
gradient of W + ΔW), as full fine-tuning. ``"activation"`` adds x·ΔWᵀ to the base output (a custom autograd
function on linear ops, non-reentrant checkpointing on convs): three matmuls more; it is the only path that
can drop the adapter's input, so dropout always uses it. Grouped convs without dropout, MultiheadAttention,
fused q/k/v blocks and generic modules always run as W + ΔW. ``benchmarks/snella.py`` measures the paths
(the tables are in ``benchmarks/README.md``).

Under ``torch.compile`` every path is the same ΔW from stock operations (``snella_kernel.traced_kernel_value``, and
``snella_sparse.traced_top_mask``: the same entries from a sort, with the ``budget`` buffer as a tensor, so a
re-allocation does not recompile), differentiated by the traced graph: one graph, the eager values and gradients.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionpeft.distributed import full_tensor
from visionpeft.layers.kinds import Slot, rebuildable
from visionpeft.methods.base import Method, Option, adapter_dtype, positive_int, probability, register
from visionpeft.methods.snella_kernel import PIECE_WEIGHTS
from visionpeft.methods.snella_schedule import allocate, reallocation_budget
from visionpeft.methods.snella_sparse import DeltaState, LinearKernelDelta, SparseKernel, traced_sparse_kernel

KERNELS = ("distance", "distance+softmax")
PATHS = ("activation", "weight")


def _even_rank(value: Any) -> bool:
    return positive_int(value) and value % 2 == 0


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


def _betas(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(probability(b) for b in value)


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
        "interval": Option(10, positive_int, "an int >= 1",
                           "during the decay, re-allocate at the steps that are multiples of it"),
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
        """A function of the factors giving ΔW (out, fan_in), differentiable through :class:`SparseKernel`;
        the budget is fixed now, and the kept entries are chosen on its first call and reused after."""
        state = DeltaState(self._budget)

        def build(in_pieces: torch.Tensor, out_pieces: torch.Tensor, mixture: torch.Tensor | None = None) -> torch.Tensor:
            return SparseKernel.apply(state, in_pieces, out_pieces, mixture)

        build.state = state
        return build

    def delta(self) -> torch.Tensor:
        if torch.compiler.is_compiling():  # stock operations, differentiated by the traced graph (module docstring)
            return traced_sparse_kernel(self.budget, *self._factors()).view(self.slot_shape)
        return self._builder()(*self._factors()).view(self.slot_shape)

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return weight + self.delta().to(weight.dtype)
        build, factors, shape = self._builder(), self._factors(), self.slot_shape
        effective = weight + build(*factors).view(shape).to(weight.dtype)
        # the op keeps the factors, not W + ΔW, for its backward (layers.kinds.rebuilt_on_backward); the
        # rebuild hands its kernel terms on to SparseKernel.backward
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
        if torch.compiler.is_compiling():
            return out.add_(slot.run(x, self.delta().to(x.dtype)).to(out.dtype))
        build = self._builder()
        if slot.op == "linear":
            return out.add_(LinearKernelDelta.apply(x, build, *self._factors()).to(out.dtype))
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
        """One EMA step of sensitivity |θ·∇θ| and its uncertainty, for both factors (skipped without grads); the
        factors and gradients of an FSDP2 model are gathered first, so every rank allocates the same budgets."""
        beta1, beta2 = betas
        for param, sensitivity, uncertainty in ((self.in_pieces, self.sensitivity_in, self.uncertainty_in),
                                                (self.out_pieces, self.sensitivity_out, self.uncertainty_out)):
            if param.grad is None:
                continue
            current = (full_tensor(param) * full_tensor(param.grad)).abs().nan_to_num_(0.0, 0.0, 0.0)
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
