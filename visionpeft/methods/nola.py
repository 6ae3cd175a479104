"""NOLA (Koohpayegani et al., ICLR 2024): LoRA's factors as linear combinations of frozen random bases.

A = A0 + Σᵢ αᵢ Aᵢ (i = 1..k) and B = Σⱼ βⱼ Bⱼ (j = 1..l), ΔW = s·B·A with s = alpha/rank. Only the k + l
coefficients train, whatever the layer's size. This is the reference's language-model convention
(``gpt/src/model_nola.py``): bases uniform in [−1, 1), A0 a frozen Kaiming-uniform matrix like LoRA's A, every
coefficient zero at attach, so ΔW = 0 (attaching changes nothing) and B's coefficients get the first gradient.
(Its ViT path starts at αᵢ = 1/k, βⱼ = 1/l, a non-zero ΔW.)

The bases of one factor are the k windows of one pseudo-random sequence p of length numel + k − 1 (numel = the
factor's size): Aᵢ = p[i : i + numel] reshaped, a random Toeplitz basis. Each basis is uniform in [−1, 1) as the
reference's are, but they are not independent of each other: the reference draws k·numel independent values and
either stores them (its ViT path) or draws them again in forward and backward (its LLM path); at k = l = 1024 on a
ViT-S that is 0.5 G values to draw twice per step (seconds on a CPU) or 2 GB to keep. One sequence per factor is
numel + k values, LoRA's size, kept as a non-persistent buffer, and both the combination Σ cᵢ Aᵢ and its
gradient ⟨∇A, Aᵢ⟩ are correlations with p, one FFT each (float64, so they match the direct sums to float32
round-off).

p and A0 come from a per-layer seed, a SHA-256 hash of the adapter's ``seed`` and the layer's qualified name
(``NOLA.prepare``), drawn by a local CPU ``torch.Generator`` (the global RNG is never touched), so they are the
same in every process and on every device. They are never stored: the checkpoint holds the coefficients and an
empty ``layer_shape`` stamp (zero elements, shaped like the layer's weight, so that loading onto a layer of
another shape fails the shape check), and ``adapter.json`` the seed.

A and B then run as LoRA's factors: on activations for linear ops and ungrouped convs (the fused low-rank
branch), through ΔW for grouped convs, MultiheadAttention and modules with their own forward.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

from scipy.fft import next_fast_len  # scipy comes with scikit-learn
import torch
from torch import nn

from visionpeft.layers.kinds import Slot
from visionpeft.methods.base import (
    Method, Option, adapter_dtype, positive_int, positive_number_or_none, register,
)
from visionpeft.methods.lowrank import add_low_rank_output


def _two_positive_ints(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(positive_int(v) for v in value)


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from a SHA-256 hash of ``parts`` (stable across processes, unlike ``hash()``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_sequence(seed: int, length: int) -> torch.Tensor:
    """``length`` values uniform in [−1, 1) (float32) from a local CPU generator seeded with ``seed``."""
    return torch.rand(length, generator=torch.Generator().manual_seed(seed)).mul_(2).sub_(1)


class WindowBases(nn.Module):
    """``count`` bases of ``shape``: basis i is ``sequence[i : i + numel]``; combinations by FFT correlation."""

    def __init__(self, seed: int, count: int, shape: tuple[int, ...], device: torch.device) -> None:
        super().__init__()
        self.count, self.shape = count, tuple(shape)
        self.numel = math.prod(shape)
        self.length = self.numel + count - 1
        # zero-padded to a 2^a·3^b·5^c length (an FFT of a length with a large prime factor is 10-30x slower)
        self.fft_size = next_fast_len(self.length, real=True)
        self.register_buffer("sequence", random_sequence(seed, self.length).to(device), persistent=False)

    def basis(self, index: int) -> torch.Tensor:
        return self.sequence[index:index + self.numel].view(self.shape)

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Σᵢ cᵢ basisᵢ: out[t] = Σᵢ cᵢ·sequence[t + i], a correlation (no wrap-around: t + i < length)."""
        return _Correlation.apply(self.sequence, coefficients, self.numel, self.fft_size).view(self.shape)


def _correlate(sequence: torch.Tensor, weights: torch.Tensor, length: int, fft_size: int) -> torch.Tensor:
    """``out[t] = Σᵢ weights[i]·sequence[t + i]`` for t < length, by FFT in float64, in ``weights``' dtype."""
    spectrum = torch.fft.rfft(sequence.double(), n=fft_size) * torch.fft.rfft(weights.double(), n=fft_size).conj()
    return torch.fft.irfft(spectrum, n=fft_size)[:length].to(weights.dtype)


class _Correlation(torch.autograd.Function):
    """The combination and its gradient as two correlations with the frozen sequence. Autograd through the FFTs
    would keep their float64 and complex spectra for backward (about 12 bytes per basis element per layer, more
    than LoRA's whole overhead); this keeps only the sequence, which is a live buffer anyway."""

    @staticmethod
    def forward(ctx, sequence, coefficients, numel, fft_size):
        ctx.save_for_backward(sequence)
        ctx.fft_size, ctx.count = fft_size, coefficients.numel()
        return _correlate(sequence, coefficients, numel, fft_size)

    @staticmethod
    def backward(ctx, grad):
        (sequence,) = ctx.saved_tensors
        # ∂/∂cᵢ of Σₜ gₜ·out[t] = Σₜ gₜ·sequence[t + i]: the same correlation, with the gradient as the weights
        return None, _correlate(sequence, grad.contiguous(), ctx.count, ctx.fft_size), None, None


@register
class NOLA(Method):
    name = "nola"
    options = {
        "rank": Option(8, positive_int, "an int >= 1", "rank of A and B"),
        "num_basis": Option((1024, 1024), _two_positive_ints, "two ints >= 1, (k, l)",
                            "number of random bases of A (k) and of B (l): the trainable values per layer"),
        "seed": Option(0, _non_negative_int, "an int >= 0", "seed of the bases (with each layer's name)"),
        "alpha": Option(None, positive_number_or_none, "a number > 0, or None for alpha = rank", "scale numerator"),
    }

    def __init__(self, slot: Slot, rank: int, num_basis, seed: int, alpha: float | None,
                 layer_seed: int | None = None) -> None:
        super().__init__(slot, rank=rank, num_basis=tuple(num_basis), seed=seed, alpha=alpha)
        if layer_seed is None:
            raise ValueError("nola needs a per-layer seed (computed by NOLA.prepare from seed and the layer's name)")
        k, l = num_basis
        self.rank, self.scale = rank, (rank if alpha is None else alpha) / rank
        dtype = adapter_dtype(slot.dtype)
        fan_in, out = slot.in_features, slot.out_features
        self.bases_A = WindowBases(derived_seed(layer_seed, "A"), k, (rank, fan_in), slot.device)
        self.bases_B = WindowBases(derived_seed(layer_seed, "B"), l, (out, rank), slot.device)
        initial = nn.init.kaiming_uniform_(torch.empty(rank, fan_in), a=math.sqrt(5),  # LoRA's A init
                                           generator=torch.Generator().manual_seed(layer_seed))
        self.register_buffer("initial_A", initial.to(slot.device, dtype), persistent=False)  # A0, redrawn on load
        self.register_buffer("layer_shape", torch.empty(0, *slot.shape, device=slot.device))
        self.nola_alpha = nn.Parameter(torch.zeros(k, dtype=dtype, device=slot.device))
        self.nola_beta = nn.Parameter(torch.zeros(l, dtype=dtype, device=slot.device))

    @classmethod
    def prepare(cls, slots, options):
        return [dict(options, layer_seed=derived_seed(options["seed"], label)) for label, _, _ in slots]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (rank × fan_in), B (out × rank)) as combinations of the bases, differentiable in the coefficients."""
        return self.initial_A + self.bases_A.combine(self.nola_alpha), self.bases_B.combine(self.nola_beta)

    def delta(self) -> torch.Tensor:
        down, up = self.factors()
        return (up @ down).mul_(self.scale).view(self.slot_shape)

    def uses_activation_path(self, slot: Slot) -> bool:
        return slot.op == "linear" or (slot.op == "conv" and slot.groups == 1)

    def add_output_delta(self, x: torch.Tensor, out: torch.Tensor, slot: Slot) -> torch.Tensor:
        down, up = self.factors()
        return add_low_rank_output(x, out, slot, down, up, self.scale)
