"""SaRA's selection: the global magnitude threshold θ below which exactly k targeted entries lie."""
from __future__ import annotations

import math
from typing import Sequence

import torch

#: bits of the magnitudes' patterns resolved per radix pass (a 65536-bucket histogram)
_DIGIT_BITS = 16


def selection_dtype(weights: Sequence[torch.Tensor]) -> torch.dtype:
    """The float type in which every targeted magnitude is exact: float64 if any weight is, else float32."""
    return torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32


def magnitudes(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|w| of the flat weight in ``dtype`` (from :func:`selection_dtype`)."""
    return weight.detach().reshape(-1).to(dtype).abs()


def _bits_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.int64 if dtype == torch.float64 else torch.int32


def _magnitude_bits(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|w| as the bit patterns of ``dtype``: for non-negative floats, integer order is numeric order."""
    return magnitudes(weight, dtype).view(_bits_dtype(dtype))


def _first_reaching(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bucket holding the ``rank``-th smallest entry (1-based), and how many entries lie before it."""
    cumulative = counts.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, torch.tensor([rank], device=cumulative.device)))
    return bucket, int(cumulative[bucket - 1]) if bucket else 0


def global_threshold(weights: Sequence[torch.Tensor], keep: int) -> float:
    """θ such that exactly the ``keep`` smallest magnitudes are ``< θ`` (fewer if magnitudes tie at θ):
    the (keep+1)-th smallest magnitude, in :func:`selection_dtype` so that no rounding moves an entry across
    it. Exact, by a radix select over the magnitudes' bit patterns, 16 bits a pass (two passes for float32,
    four for float64), each pass a histogram over the tensors one at a time of the next 16 bits of the
    entries that share the bits found so far, so no copy of all the weights is made as a global
    ``kthvalue`` would."""
    if keep >= sum(w.numel() for w in weights):
        return math.inf
    dtype = selection_dtype(weights)
    width = torch.finfo(dtype).bits
    prefix, rank = 0, keep + 1
    for shift in range(width - _DIGIT_BITS, -1, -_DIGIT_BITS):
        counts = 0
        for weight in weights:
            bits = _magnitude_bits(weight, dtype)
            if shift + _DIGIT_BITS < width:
                bits = bits[(bits >> (shift + _DIGIT_BITS)) == prefix]
            counts = counts + torch.bincount((bits >> shift) & ((1 << _DIGIT_BITS) - 1), minlength=1 << _DIGIT_BITS).cpu()
        digit, before = _first_reaching(counts, rank)
        prefix, rank = (prefix << _DIGIT_BITS) | digit, rank - before
    return torch.tensor(prefix, dtype=_bits_dtype(dtype)).view(dtype).item()
