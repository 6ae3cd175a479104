"""What a low-rank branch keeps of its input for backward: the input itself, or what the graph already keeps.

The down factor's gradient needs the branch input x. A frozen base op keeps no copy of its input (its weight
gradient is not wanted), so saving x adds one activation per adapted layer, unless another node of the graph
already keeps it. That is the case after an elementwise activation whose backward saves its *input*: x = GELU(u)
with u saved by GELU's node (an MLP's second linear; SiLU before a UNet conv). There the branch saves u, which the
graph keeps anyway, and rebuilds x in backward by running the same aten op on the same tensor, which gives x bit
for bit. An activation that saves its result (ReLU, tanh, sigmoid) already keeps x itself: nothing is extra and
nothing changes.

The rebuild is used only where it is plainly the same value: x is the activation's own output (not a view of it),
u is what the activation's node holds (no saved-tensor hooks on it, and none active now: offloading or
checkpointing decide themselves what is kept), u has x's shape and dtype, and the node still has u at its saved
version (an in-place change since is an error in backward, as it would be for the activation itself). A branch
on dropout's output sees a different tensor and saves it, as before. The functions using this are first-order only.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from visionpeft.layers.kinds import _other_saved_tensor_hooks

aten = torch.ops.aten

#: backward node → how its output is rebuilt from the node's saved input (``_saved_self``), with the node's saved
#: scalars read when the branch saves, so that nothing keeps the node itself
_REBUILDS: dict[str, Callable] = {
    "GeluBackward0": lambda node: partial(aten.gelu, approximate=node._saved_approximate),
    "SiluBackward0": lambda node: aten.silu,
    "MishBackward0": lambda node: aten.mish,
    "HardswishBackward0": lambda node: aten.hardswish,
    "HardsigmoidBackward0": lambda node: aten.hardsigmoid,
    "LeakyReluBackward0": lambda node: partial(aten.leaky_relu, negative_slope=node._saved_negative_slope),
    "EluBackward0": lambda node: partial(aten.elu, alpha=node._saved_alpha, scale=node._saved_scale,
                                         input_scale=node._saved_input_scale),
    "CeluBackward0": lambda node: partial(aten.celu, alpha=node._saved_alpha),
    "SoftplusBackward0": lambda node: partial(aten.softplus, beta=node._saved_beta, threshold=node._saved_threshold),
    "HardtanhBackward0": lambda node: partial(aten.hardtanh, min_val=node._saved_min_val, max_val=node._saved_max_val),
}


def keep_input(x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
    """What to save for x, and how x comes back from it: the input of the activation x came from and that
    activation, where the activation's node keeps its input; else x and None. Keep the function, never the tensor,
    beside the saved tensors (``ctx.save_for_backward`` decides the tensor's lifetime)."""
    node = x.grad_fn
    make = _REBUILDS.get(type(node).__name__) if node is not None else None
    if make is None or x._is_view():
        return x, None
    raw = getattr(node, "_raw_saved_self", None)
    if raw is None or raw.unpack_hook is not None or _other_saved_tensor_hooks():
        return x, None
    try:
        source = node._saved_self
    except RuntimeError:  # changed in place since the activation ran, or already freed: keep x
        return x, None
    if source.shape != x.shape or source.dtype != x.dtype or source.untyped_storage().data_ptr() == \
            x.untyped_storage().data_ptr():
        return x, None
    return source.detach(), make(node)  # detached: the saved tensor needs no history


def kept_value(saved: torch.Tensor, rebuild: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """x from what :func:`keep_input` had saved (unpacked) and its rebuild."""
    return saved if rebuild is None else rebuild(saved)
