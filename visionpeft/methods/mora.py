"""MoRA (Jiang et al., 2024): a square update ΔW = f_decomp · M · f_comp, at LoRA's parameter budget.

M is r̂ × r̂ with r̂ = ⌊√((fan_in + out)·rank) + ½⌋, so it has about as many entries as a rank-``rank`` LoRA, and
starts at zero (attaching changes nothing). There is no alpha/rank scale. The compression and decompression
operators have no parameters, which keeps the update mergeable. ``operator`` (the reference's ``mora_type``):

- ``"sharing"`` (type 1, the reference's default): x is wrap-padded to a multiple of r̂ (x[p mod fan_in] at
  position p), its r̂-sized chunks are summed, M maps the sum, and the result is tiled over the outputs:
  ΔW[i, j] = Σ over padded positions p ≡ j (mod fan_in) of M[i mod r̂, p mod r̂].
- ``"rotation"`` (type 6; r̂ rounded down to even): x is wrap-padded and cut into chunks as above, chunk c is
  rotated RoPE-style (angle c·10000^(−2t/r̂) on the pair (t, t + r̂/2)), M maps every chunk, and the chunks'
  outputs are concatenated, truncated to the outputs (tiled if short): ΔW is block-diagonal with rotated copies of M.
- ``"truncation"`` (the paper's weakest variant): the first r̂ inputs in, the first r̂ outputs out.

``operator=None`` (the default) picks rotation for rank ≤ 32 and sharing above, as the reference advises.
Where r̂ exceeds fan_in, the reference's padding (``x[..., :pad]`` once) falls short; wrap-padding by index is
the same wherever the reference's is defined and extends it there.

Paths: on linear ops (Linear, transformers' Conv1D) the update runs on activations and never builds ΔW; convs
(the (out, in/groups·k) view of their kernel), MultiheadAttention and modules with their own forward take the
weight path with :meth:`MoRA.delta`, the exactly equivalent dense ΔW, built in O(out·fan_in) from M.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from visionpeft.layers.kinds import Slot
from visionpeft.methods.base import Method, Option, adapter_dtype, positive_int, register

OPERATORS = ("sharing", "rotation", "truncation")
#: the largest rank for which ``operator=None`` picks rotation (the reference README: type 6 for small ranks)
ROTATION_UP_TO_RANK = 32


def square_size(fan_in: int, out: int, rank: int, operator: str) -> int:
    """r̂ = ⌊√((fan_in + out)·rank) + ½⌋, rounded down to even (at least 2) for rotation."""
    size = int(math.floor(math.sqrt((fan_in + out) * rank) + 0.5))
    return max(2, size - size % 2) if operator == "rotation" else max(1, size)


def resolve_operator(operator: str | None, rank: int) -> str:
    if operator is None:
        return "rotation" if rank <= ROTATION_UP_TO_RANK else "sharing"
    return operator


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@register
class MoRA(Method):
    name = "mora"
    options = {
        "rank": Option(8, positive_int, "an int >= 1", "LoRA rank whose parameter budget M matches"),
        "operator": Option(None, lambda v: v is None or v in OPERATORS,
                           f"None (rotation for rank <= {ROTATION_UP_TO_RANK}, sharing above) or one of "
                           f"{', '.join(map(repr, OPERATORS))}",
                           "compression/decompression operator"),
    }

    def __init__(self, slot: Slot, rank: int, operator: str | None) -> None:
        super().__init__(slot, rank=rank, operator=operator)
        self.operator = resolve_operator(operator, rank)
        self.fan_in, self.out = slot.in_features, slot.out_features
        self.size = r = square_size(self.fan_in, self.out, rank, self.operator)
        self.chunks = -(-self.fan_in // r)  # chunks of the wrap-padded input
        dtype = adapter_dtype(slot.dtype)
        self.mora_M = nn.Parameter(torch.zeros(r, r, dtype=dtype, device=slot.device))
        cos = sin = None
        if self.operator == "rotation":
            inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
            angles = torch.outer(torch.arange(self.chunks, dtype=torch.float32), inv_freq).repeat(1, 2)
            cos, sin = angles.cos().to(slot.device, dtype), angles.sin().to(slot.device, dtype)
        self.register_buffer("rotation_cos", cos, persistent=False)  # (chunks, r̂), recomputed, never saved
        self.register_buffer("rotation_sin", sin, persistent=False)

    # --- activation path (linear ops) ------------------------------------------------------------
    def uses_activation_path(self, slot: Slot) -> bool:
        return slot.op == "linear"

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """x wrap-padded to ``chunks · r̂`` features: position p holds x[p mod fan_in]."""
        length = self.chunks * self.size
        if length == self.fan_in:
            return x
        return x.repeat(*([1] * (x.dim() - 1)), -(-length // self.fan_in))[..., :length]

    def _tiled(self, h: torch.Tensor) -> torch.Tensor:
        """h's last dim truncated to the outputs, or tiled first where it is shorter."""
        if h.shape[-1] < self.out:
            h = h.repeat(*([1] * (h.dim() - 1)), -(-self.out // h.shape[-1]))
        return h[..., :self.out]

    def compressed_output(self, x: torch.Tensor) -> torch.Tensor:
        """f_decomp(M · f_comp(x)) for x of shape (..., fan_in)."""
        m = self.mora_M.to(x.dtype)
        r = self.size
        if self.operator == "truncation":
            z = x[..., :r]
            h = z @ m[:, :z.shape[-1]].t()
            return h[..., :self.out] if r >= self.out else torch.nn.functional.pad(h, (0, self.out - r))
        chunks = self._padded(x).unflatten(-1, (self.chunks, r))
        if self.operator == "sharing":
            return self._tiled(chunks.sum(-2) @ m.t())
        cos, sin = self.rotation_cos.to(x.dtype), self.rotation_sin.to(x.dtype)
        rotated = chunks * cos + rotate_half(chunks) * sin
        return self._tiled((rotated @ m.t()).flatten(-2))

    def add_output_delta(self, x: torch.Tensor, out: torch.Tensor, slot: Slot) -> torch.Tensor:
        return out + self.compressed_output(x).to(out.dtype)

    # --- the dense equivalent (weight path, merges) ----------------------------------------------
    def delta(self) -> torch.Tensor:
        m, r, fan_in, out = self.mora_M, self.size, self.fan_in, self.out
        device = m.device
        if self.operator == "truncation":
            dense = torch.zeros(out, fan_in, dtype=m.dtype, device=device)
            rows, cols = min(r, out), min(r, fan_in)
            dense[:rows, :cols] = m[:rows, :cols]
            return dense.view(self.slot_shape)
        length = self.chunks * r
        folded = torch.arange(length, device=device) % fan_in  # input feature of each padded position
        if self.operator == "sharing":
            # column j of M·C sums M's columns p mod r̂ over padded positions p that hold x_j; rows tile
            per_input = torch.zeros(r, fan_in, dtype=m.dtype, device=device)
            per_input.index_add_(1, folded, m[:, torch.arange(length, device=device) % r])
            return per_input[torch.arange(out, device=device) % r].view(self.slot_shape)
        # rotation: block c is M·R_c, with R_cᵀ the rotation of the identity by chunk c's angles
        eye = torch.eye(r, dtype=m.dtype, device=device).expand(self.chunks, r, r)
        rotated_eye = eye * self.rotation_cos[:, None, :] + rotate_half(eye) * self.rotation_sin[:, None, :]
        blocks = m @ rotated_eye.transpose(1, 2)  # (chunks, r̂, r̂)
        position = torch.arange(out, device=device) % length  # output i reads concatenated position i mod (chunks·r̂)
        chunk = position // r
        rows = blocks[chunk, position % r]  # (out, r̂): the row of its block each output uses
        columns = folded[chunk[:, None] * r + torch.arange(r, device=device)]
        dense = torch.zeros(out, fan_in, dtype=m.dtype, device=device)
        return dense.scatter_add(1, columns, rows).view(self.slot_shape)
