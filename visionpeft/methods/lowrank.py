"""The shared activation path of low-rank updates ΔW = up · diag(mid) · down on linear ops and convs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from visionpeft.layers.kinds import Slot


def add_low_rank_output(x: torch.Tensor, out: torch.Tensor, slot: Slot, down: torch.Tensor, up: torch.Tensor,
                        mid: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``out + up · (mid ⊙ down(x))``, where ``down`` is (rank, fan_in) or (rank, channels of x, *kernel), run with the
    slot's own geometry (a conv of the base's kernel, stride, padding, dilation and padding_mode into ``rank``
    channels; needs groups == 1 for convs) and ``up`` is (out, rank) run as a 1×1 map.

    The up-projection and the sum are one ``addmm``/``baddbmm`` on the base output: no separate
    output-sized product. It is deliberately not in place: an in-place op on a view of the output makes
    autograd copy the whole output gradient in backward (measured 6-13% slower per layer than this).
    Backward keeps only x, the rank-sized activation and the factors, never a weight-sized tensor.
    """
    rank = down.shape[0]
    up = up.to(out.dtype)
    # a scalar ``mid`` rides on the fused product's alpha: no extra op (and no backward) on the activation
    alpha = 1.0 if isinstance(mid, torch.Tensor) else float(mid)
    if slot.op == "linear":
        h = F.linear(x, down.to(x.dtype))
        if isinstance(mid, torch.Tensor):
            h = h * mid
        # A contiguous (rank, out) right operand makes autograd compute up's gradient as hᵀ·g; with the
        # transposed view it computes (gᵀ·h)ᵀ, which oneDNN runs up to 9x slower for a tall, skinny h.
        up_t = up.t().contiguous()
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, rank).to(out.dtype), up_t,
                           alpha=alpha).view(out.shape)
    h = slot.run(x, down.to(x.dtype).reshape(rank, -1, *slot.shape[2:]), groups=1)  # x may have any channel count
    spatial = (1,) * (len(slot.shape) - 2)
    if isinstance(mid, torch.Tensor):
        h = h * mid.view(rank, *spatial)
    h = h.to(out.dtype)
    if out.is_contiguous() and h.is_contiguous():
        n, c = out.shape[:2]
        return torch.baddbmm(out.view(n, c, -1), up.expand(n, -1, -1), h.view(n, rank, -1),
                             alpha=alpha).view(out.shape)
    return out + slot.pointwise(h, up.view(*up.shape, *spatial)).mul_(alpha)
