"""CLIP-SVD (Koleilat et al., 2025; after SVF, Sun et al., 2022): train only the singular values.

Each targeted weight (a conv kernel on its (out, in/groups·k…) reshape; a fused q/k/v projection per
block, never as one stacked matrix) is decomposed once, in float64, as W = U diag(σ) Vᵀ (through the
eigendecomposition of the smaller Gram matrix where that is accurate, faster than LAPACK's SVD at attach;
``torch.linalg.svd`` otherwise; see :func:`_svd_by_gram`); the adapter
trains s, initialised to σ, and contributes

    ΔW = U_k diag(s − σ_k) V_kᵀ

over the top ``k = ceil(rank_ratio · min(out, in))`` singular directions. Writing the update as a delta
keeps attaching bit-exact (s − σ is exactly zero) and merging exact, with no reconstruction error of
the SVD entering the forward. U_k and V_k are non-persistent buffers recomputed from the base weight
(never optimised, never saved); the adapter file holds s, σ and a fingerprint of the basis, so loading
onto a base whose SVD basis differs (other weights, or a non-unique basis) fails clearly instead of
silently changing the model. Singular vectors get a deterministic sign (largest entry of each u
positive) so the basis is reproducible.

Forward paths (``path``): "weight" runs the op with W + U_k diag(s − σ) V_kᵀ (materialised once per call,
2·d²·k extra multiply-adds, plus the weight gradient of the op in backward); "factorized" adds
U_k((s − σ) ⊙ V_kᵀx) to the output (about 4·tokens·d·k extra in forward and backward). "auto" takes
the factorized path only when few directions train (4k ≤ min(out, in)), where it is cheaper, and the
weight path otherwise: with every direction trainable (k = d) it wins whenever a batch has more than
about 2d/3 tokens, which is every realistic CLIP batch (``benchmarks/svd.py`` measures both).

Choices that differ from the reference code:

* **Kept directions.** ``k = ceil(rank_ratio · min(out, in))``, at least 1. The reference floors
  ``rank_ratio · min(out, in)`` to a multiple of 4 (at least 1), which drops up to 3 directions even at
  ``rank_ratio=1`` on a dimension that is not a multiple of 4 (a 10-class head keeps 8, a 3-channel stem 1);
  here ``rank_ratio=1`` always trains every singular value, and a smaller ratio rounds up, so the kept count
  is the fraction asked for. The two agree on every CLIP and BiomedCLIP dimension at ratio 1 (all multiples
  of 4).
* **The update as a delta.** The reference replaces the layer by its top-k factors, y = U_k(s ⊙ V_kᵀx) + b,
  so the SVD's round-off enters the forward at step 0 and, below full rank, the other directions leave the
  model; here the base op runs unchanged and ΔW = U_k diag(s − σ_k) V_kᵀ is added (exact start, exact merge,
  the untrained directions kept frozen).
* **A saved basis check.** The reference saves the whole factorised state dict (U and V included); here U
  and V are recomputed from the base weight and only a fingerprint of them is saved, checked on load.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from visionpeft.layers.kinds import Slot
from visionpeft.methods.base import Method, Option, adapter_dtype, boolean, register
from visionpeft.methods.lowrank import add_low_rank_output

_FINGERPRINT_PROBES = 4
_FINGERPRINT_TOLERANCE = 1e-3
_RECONSTRUCTION_TOLERANCE = 1e-6


def _ratio(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


def _path(value: Any) -> bool:
    return value in ("auto", "factorized", "weight")


def _probes(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(n)
    return torch.randn(_FINGERPRINT_PROBES, n, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def _probe_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm().clamp_min(1e-300))


def _svd_by_gram(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Thin SVD from the eigendecomposition of the smaller Gram matrix, or None where that is not accurate.

    For a tall A (m ≥ n): AᵀA = V diag(σ²) Vᵀ, then U = A V / σ. Faster than ``torch.linalg.svd``
    (``benchmarks/svd.py``): the O(m·n²) work is two matrix products, and only the n×n eigenproblem is LAPACK. U·diag(σ)·Vᵀ = A·V·Vᵀ reproduces A exactly
    for any orthonormal V, but the Gram squares the condition number, so U's columns lose orthogonality
    as eps·(σ₁/σᵢ)²: the result is refused when a probe shows UᵀU ≠ I to 1e-9, or when σ has a zero.
    """
    tall = matrix.shape[0] >= matrix.shape[1]
    a = matrix if tall else matrix.t()
    eigenvalues, v = torch.linalg.eigh(a.t() @ a)
    sigma = eigenvalues.flip(0).clamp_min(0).sqrt()
    if not sigma[-1] > 0:
        return None
    v = v.flip(1)
    u = (a @ v) / sigma
    probe = _probes(u.shape[1], torch.float64, u.device)[0]
    if _probe_error(u.t() @ (u @ probe), probe) > 1e-9:
        return None
    return (u, sigma, v) if tall else (v, sigma, u)


def decompose(weight: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``weight`` (as a matrix) in float64 with deterministic signs: (U_k, σ_k, V_k).

    Through the Gram matrix where that is accurate (:func:`_svd_by_gram`), else ``torch.linalg.svd``.
    Raises ValueError if U diag(σ) Vᵀ does not reproduce the weight to 1e-6 (relative, on random probes).
    """
    matrix = weight.detach().reshape(weight.shape[0], -1).double()
    found = _svd_by_gram(matrix)
    if found is None:
        u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
        v = vh.t()
    else:
        u, sigma, v = found
    flip = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True))).squeeze(0)
    flip[flip == 0] = 1
    u, v = u * flip, v * flip
    probe = _probes(matrix.shape[1], torch.float64, matrix.device)[:2].t()
    error = _probe_error((u * sigma) @ (v.t() @ probe), matrix @ probe)
    if error > _RECONSTRUCTION_TOLERANCE:
        raise ValueError(f"SVD does not reproduce the weight (relative error {error:.2e} > {_RECONSTRUCTION_TOLERANCE})")
    return u[:, :keep], sigma[:keep], v[:, :keep]


@register
class SVD(Method):
    name = "svd"
    aliases = ("clip-svd",)
    split_fused = True
    options = {
        "rank_ratio": Option(1.0, _ratio, "a number in (0, 1]", "fraction of singular directions whose values train"),
        "train_bias": Option(False, boolean, "True or False", "also train the targeted layers' biases"),
        "path": Option("auto", _path, "'auto', 'factorized' or 'weight'",
                       "forward: x → Vᵀ → (s − σ) → U added to the output, or the op with W + ΔW"),
    }

    def __init__(self, slot: Slot, rank_ratio: float, train_bias: bool, path: str,
                 basis: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__(slot, rank_ratio=rank_ratio, train_bias=train_bias, path=path)
        if basis is None:
            raise ValueError("svd needs the base weight's decomposition (built by SVD.prepare)")
        u, sigma, v = basis
        store = slot.dtype if slot.dtype.is_floating_point else torch.float32
        self.register_buffer("U", u.to(store), persistent=False)
        self.register_buffer("V", v.to(store), persistent=False)
        dtype = adapter_dtype(slot.dtype)
        self.register_buffer("sigma", sigma.to(dtype))
        self.s = nn.Parameter(sigma.to(dtype).clone())
        self.register_buffer("fingerprint", self._fingerprint())
        self.path = path

    @classmethod
    def refuses_quantized(cls, options):
        return ("decomposes the weight by SVD, and a quantized weight is not read exactly: its singular basis would "
                "be that of the dequantized weight, and change with every requantization")

    @classmethod
    def prepare(cls, slots, options):
        per_slot = []
        for label, slot, weight in slots:
            keep = max(1, math.ceil(options["rank_ratio"] * min(weight.shape[0], math.prod(weight.shape[1:]))))
            try:
                basis = decompose(weight, keep)
            except ValueError as err:
                raise ValueError(f"{label}: {err}") from None
            per_slot.append(dict(options, basis=basis))
        return per_slot

    @classmethod
    def trains_bias(cls, options: dict[str, Any]) -> bool:
        return bool(options["train_bias"])

    def _fingerprint(self) -> torch.Tensor:
        """Projections of every kept singular vector on fixed random probes: (2, probes, k)."""
        u, v = self.U.double(), self.V.double()
        return torch.stack([_probes(u.shape[0], torch.float64, u.device) @ u,
                            _probes(v.shape[0], torch.float64, v.device) @ v]).float()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "fingerprint")
        if saved is not None and saved.shape == self.fingerprint.shape:
            gap = (saved.to(self.fingerprint) - self.fingerprint).abs().max().item()
            if gap > _FINGERPRINT_TOLERANCE * max(1.0, self.fingerprint.abs().max().item()):
                raise ValueError(
                    f"svd adapter {prefix.rstrip('.')!r} was trained on another singular basis (fingerprint differs by "
                    f"{gap:.2e}): the base weights differ from the ones it was saved with, or their SVD is not unique")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def delta(self) -> torch.Tensor:
        scale = (self.s - self.sigma).to(self.U.dtype)
        return ((self.U * scale) @ self.V.t()).view(self.slot_shape)

    def uses_activation_path(self, slot: Slot) -> bool:
        if self.path == "weight" or slot.op not in ("linear", "conv") or (slot.op == "conv" and slot.groups != 1):
            return False
        return self.path == "factorized" or 4 * self.s.numel() <= min(self.U.shape[0], self.V.shape[0])

    def add_output_delta(self, x: torch.Tensor, out: torch.Tensor, slot: Slot) -> torch.Tensor:
        return add_low_rank_output(x, out, slot, self.V.t(), self.U, (self.s - self.sigma).to(x.dtype))

    def extra_repr(self) -> str:
        return f"directions={self.s.numel()}, rank_ratio={self.config['rank_ratio']}, path={self.path}"
