"""Layer kinds: how to read a module's adaptable weights and run its op with other weights.

Every weight is exposed in a canonical orientation ``(out, in_per_group, *kernel)``: transformers'
``Conv1D`` stores its weight transposed, and ``nn.MultiheadAttention`` keeps its projections as raw
parameters. A method only ever sees a :class:`Slot`; the module stays behind the kind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from visionpeft.layers import depthwise
from visionpeft.layers.depthwise import CONV_FUNCTIONS
_STOCK_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


@dataclasses.dataclass(frozen=True)
class Slot:
    """One adaptable weight: its canonical shape and the op that consumes it.

    ``op`` is "linear" (y = x Wᵀ), "conv" (an N-d convolution with the geometry below) or "other"
    (a weight used by a forward the kind cannot express as one of the two).
    ``blocks`` lists the row sizes of a fused projection (q, k, v stacked), empty if not fused.
    """

    label: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    op: str = "other"
    stride: tuple[int, ...] = ()
    padding: Any = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"
    reversed_padding: tuple[int, ...] = ()
    blocks: tuple[int, ...] = ()

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """Fan-in of one output unit (in_channels/groups times the kernel size for convs)."""
        return math.prod(self.shape[1:])

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, groups: int | None = None) -> torch.Tensor:
        """Apply this slot's op to ``x`` with ``weight`` (any number of output channels)."""
        if self.op == "linear":
            return F.linear(x, weight, bias)
        if self.op != "conv":
            raise TypeError(f"slot {self.label!r} has no functional op of its own")
        return convolve(x, weight, bias, self.stride, self.padding, self.dilation,
                        self.groups if groups is None else groups, self.padding_mode, self.reversed_padding)

    def pointwise(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Map channels with a 1×1 op: ``weight`` is (out, rank) for linear, (out, rank, 1, ...) for conv."""
        if self.op == "linear":
            return F.linear(h, weight)
        return CONV_FUNCTIONS[len(self.shape) - 2](h, weight)

    def block_split(self) -> tuple[int, ...]:
        return self.blocks or (self.shape[0],)


def convolve(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
             groups: int, padding_mode: str, reversed_padding: tuple[int, ...]) -> torch.Tensor:
    """What ``nn.Conv{1,2,3}d._conv_forward`` computes, with the faster depthwise weight gradient."""
    if padding_mode != "zeros":
        x, padding = F.pad(x, reversed_padding, mode=padding_mode), 0
    return depthwise.conv(x, weight, bias, stride, padding, dilation, groups)


@contextlib.contextmanager
def swapped_parameters(pairs: list[tuple[nn.Module, str, torch.Tensor]]) -> Iterator[None]:
    """Let ``module.<name>`` return a computed tensor while a stock forward runs."""
    saved = [(module, name, module._parameters[name]) for module, name, _ in pairs]
    try:
        for module, name, tensor in pairs:
            module._parameters[name] = tensor  # bypasses the Parameter type check on purpose
        yield
    finally:
        for module, name, original in saved:
            module._parameters[name] = original


#: attribute of a computed weight holding a function that rebuilds it (see :func:`rebuilt_on_backward`)
REBUILD_ATTR = "_vp_rebuild"


def rebuildable(effective: torch.Tensor, weight: torch.Tensor, rebuild: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Mark ``effective`` (computed from ``weight``) as rebuilt in backward by ``rebuild(base weight)``.

    ``rebuild`` must reproduce ``effective`` bit for bit from detached values. A ``weight`` that is itself
    rebuildable (another adapter's effective weight) is rebuilt in turn rather than kept alive.
    """
    if torch.compiler.is_compiling():  # a compiled graph decides itself what its backward keeps or recomputes
        return effective
    source = getattr(weight, REBUILD_ATTR, None) or weight.detach
    setattr(effective, REBUILD_ATTR, lambda: rebuild(source()))
    return effective


def _other_saved_tensor_hooks() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


@contextlib.contextmanager
def rebuilt_on_backward(weights: Iterable[torch.Tensor]) -> Iterator[None]:
    """While an op runs, save no copy of a computed weight that carries a ``_vp_rebuild`` function: autograd
    keeps the function instead and rebuilds the weight (same layout) when backward needs it. A method
    whose effective weight is cheap to rebuild (a scatter into W) thus keeps nothing weight-sized between
    forward and backward. Second-order gradients do not flow through a rebuilt weight."""
    if torch.compiler.is_compiling():  # the compiled graph decides what it keeps (and hooks do not trace)
        yield
        return
    recipes = {w.untyped_storage().data_ptr(): (getattr(w, REBUILD_ATTR), w.dtype)
               for w in weights if hasattr(w, REBUILD_ATTR) and w.numel()}
    if not recipes or _other_saved_tensor_hooks():
        # under non-reentrant checkpointing (or offloading) those hooks decide what is kept; hooks do not
        # nest, and passing tensors through ours would keep what checkpointing means to drop
        yield
        return

    def pack(tensor):
        if tensor.layout == torch.strided and tensor.device.type != "meta" and tensor.numel():
            rebuild, dtype = recipes.get(tensor.untyped_storage().data_ptr(), (None, None))
            if rebuild is not None and tensor.dtype == dtype:  # the weight itself or a view of it
                return (rebuild, tensor.size(), tensor.stride(), tensor.storage_offset())
        return tensor

    def unpack(saved):
        if isinstance(saved, tuple):
            rebuild, size, stride, offset = saved
            return rebuild().as_strided(size, stride, offset)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class LayerKind:
    """How one family of modules exposes its weights; subclasses are stateless singletons."""

    name = "layer"
    #: the op takes one input tensor (first positional argument) that activation paths may use
    single_input = False

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def slot_names(self, module: nn.Module) -> list[str]:
        raise NotImplementedError

    def parameter(self, module: nn.Module, slot: str) -> tuple[nn.Module, str]:
        """(owner module, parameter name) holding the slot's weight."""
        raise NotImplementedError

    def bias(self, module: nn.Module, slot: str) -> tuple[nn.Module, str] | None:
        """(owner module, parameter name) of the bias that goes with the slot, if it has one."""
        return (module, "bias") if isinstance(getattr(module, "bias", None), torch.Tensor) else None

    def slot(self, module: nn.Module, slot: str, qualified_name: str = "") -> Slot:
        weight = self.read(module, slot)
        return Slot(label=slot, shape=tuple(weight.shape), dtype=weight.dtype, device=weight.device)

    def read(self, module: nn.Module, slot: str) -> torch.Tensor:
        owner, name = self.parameter(module, slot)
        return getattr(owner, name)

    def write(self, module: nn.Module, slot: str, canonical: torch.Tensor) -> None:
        with torch.no_grad():
            self.read(module, slot).copy_(canonical)

    def run(self, module: nn.Module, base_forward, args: tuple, kwargs: dict, weights: dict[str, torch.Tensor]) -> Any:
        """The module's forward with some slots replaced by the given canonical weights."""
        pairs = []
        for slot, weight in weights.items():
            owner, name = self.parameter(module, slot)
            pairs.append((owner, name, self.to_storage(weight)))
        with swapped_parameters(pairs), rebuilt_on_backward(weights.values()):
            return base_forward(module, *args, **kwargs)

    def to_storage(self, canonical: torch.Tensor) -> torch.Tensor:
        return canonical


class LinearKind(LayerKind):
    name = "Linear"
    single_input = True

    def matches(self, module):
        return isinstance(module, nn.Linear)

    def slot_names(self, module):
        return ["weight"]

    def parameter(self, module, slot):
        return module, "weight"

    def slot(self, module, slot, qualified_name=""):
        w = module.weight
        # a subclass with its own forward may do more than x·Wᵀ + b: it only runs through that forward
        own_class = getattr(module, "_vp_base_class", type(module))
        op = "linear" if own_class.forward is nn.Linear.forward else "other"
        return Slot(label=slot, shape=tuple(w.shape), dtype=w.dtype, device=w.device, op=op,
                    blocks=fused_blocks(qualified_name, w.shape))

    def run(self, module, base_forward, args, kwargs, weights):
        if base_forward is not nn.Linear.forward:
            return super().run(module, base_forward, args, kwargs, weights)
        with rebuilt_on_backward(weights.values()):
            return F.linear(args[0], weights["weight"], module.bias)


class ConvKind(LayerKind):
    name = "Conv"
    single_input = True

    def matches(self, module):
        return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))

    def slot_names(self, module):
        return ["weight"]

    def parameter(self, module, slot):
        return module, "weight"

    def slot(self, module, slot, qualified_name=""):
        w = module.weight
        # a subclass with its own forward (timm's Conv2dSame pads per input) is only run through that forward
        own_class = getattr(module, "_vp_base_class", type(module))  # an adapted module's original class
        op = "conv" if own_class.forward in _STOCK_CONV_FORWARDS else "other"
        return Slot(
            label=slot, shape=tuple(w.shape), dtype=w.dtype, device=w.device, op=op,
            stride=tuple(module.stride), padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation), groups=module.groups, padding_mode=module.padding_mode,
            reversed_padding=tuple(module._reversed_padding_repeated_twice),
        )

    def run(self, module, base_forward, args, kwargs, weights):
        if base_forward not in _STOCK_CONV_FORWARDS:  # a subclass's own forward (e.g. dynamic "same" padding)
            return super().run(module, base_forward, args, kwargs, weights)
        with rebuilt_on_backward(weights.values()):
            return convolve(args[0], weights["weight"], module.bias, module.stride, module.padding, module.dilation,
                            module.groups, module.padding_mode, module._reversed_padding_repeated_twice)


class TransposedLinearKind(LayerKind):
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored as (in, out)."""

    name = "Conv1D"
    single_input = True

    def matches(self, module):
        return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor) \
            and module.weight.dim() == 2 and hasattr(module, "nf")

    def slot_names(self, module):
        return ["weight"]

    def parameter(self, module, slot):
        return module, "weight"

    def read(self, module, slot):
        return module.weight.t()

    def slot(self, module, slot, qualified_name=""):
        w = module.weight.t()
        return Slot(label=slot, shape=tuple(w.shape), dtype=w.dtype, device=w.device, op="linear",
                    blocks=fused_blocks(qualified_name, w.shape))

    def run(self, module, base_forward, args, kwargs, weights):
        with rebuilt_on_backward(weights.values()):
            return F.linear(args[0], weights["weight"], module.bias)

    def to_storage(self, canonical):
        return canonical.t()


class MultiheadAttentionKind(LayerKind):
    """``nn.MultiheadAttention``: packed ``in_proj`` (or q/k/v when kdim/vdim differ) and ``out_proj``.

    The stock forward runs with the computed weights swapped in, so every argument, the fast path
    and batch_first behave exactly as torch defines them; ``out_proj.forward`` is never called by
    MultiheadAttention, which is why its weight is a slot of the attention module itself.
    """

    name = "MultiheadAttention"

    def matches(self, module):
        return isinstance(module, nn.MultiheadAttention)

    def slot_names(self, module):
        inputs = ["in_proj"] if module._qkv_same_embed_dim else ["q", "k", "v"]
        return inputs + ["out_proj"]

    def parameter(self, module, slot):
        if slot == "out_proj":
            return module.out_proj, "weight"
        return module, {"in_proj": "in_proj_weight", "q": "q_proj_weight", "k": "k_proj_weight", "v": "v_proj_weight"}[slot]

    def bias(self, module, slot):
        if slot == "out_proj":
            return (module.out_proj, "bias") if module.out_proj.bias is not None else None
        return (module, "in_proj_bias") if module.in_proj_bias is not None else None  # q, k and v share it

    def slot(self, module, slot, qualified_name=""):
        w = self.read(module, slot)
        blocks = (module.embed_dim,) * 3 if slot == "in_proj" else ()
        return Slot(label=slot, shape=tuple(w.shape), dtype=w.dtype, device=w.device, op="linear", blocks=blocks)


class WeightKind(LayerKind):
    """Any other module with a 2-D to 5-D ``weight`` parameter: its own forward runs with W + ΔW."""

    name = "Weight"

    def matches(self, module):
        weight = getattr(module, "_parameters", {}).get("weight")
        return isinstance(weight, torch.Tensor) and 2 <= weight.dim() <= 5

    def slot_names(self, module):
        return ["weight"]

    def parameter(self, module, slot):
        return module, "weight"


class ParametersKind(LayerKind):
    """Every direct parameter of a module as a slot (``targets="all"``): weights, biases, norm affines,
    embeddings. The module's own forward runs with the computed tensors swapped in; the slots have
    no op of their own (``op="other"``), so methods take the weight path on them.

    ``nn.MultiheadAttention`` never calls its ``out_proj``'s forward, so that child's parameters are
    slots of the attention module (``out_proj_weight``, ``out_proj_bias``). Never chosen by
    :func:`kind_of`: only ``targets="all"`` selects it.
    """

    name = "Parameters"
    _MHA_OUT = {"out_proj_weight": "weight", "out_proj_bias": "bias"}

    def matches(self, module):
        return bool(self.slot_names(module))

    def slot_names(self, module):
        names = [n for n, p in module._parameters.items() if p is not None]
        if isinstance(module, nn.MultiheadAttention):
            names += [n for n, attr in self._MHA_OUT.items() if getattr(module.out_proj, attr, None) is not None]
        return names

    def parameter(self, module, slot):
        if isinstance(module, nn.MultiheadAttention) and slot in self._MHA_OUT:
            return module.out_proj, self._MHA_OUT[slot]
        return module, slot

    def bias(self, module, slot):
        return None  # a bias is a slot of its own here


PARAMETERS_KIND = ParametersKind()

#: most specific first
KINDS: tuple[LayerKind, ...] = (LinearKind(), ConvKind(), TransposedLinearKind(), MultiheadAttentionKind(), WeightKind())


def kind_of(module: nn.Module) -> LayerKind | None:
    for kind in KINDS:
        if kind.matches(module):
            return kind
    return None


_FUSED_SUFFIXES = ("qkv", "c_attn", "in_proj", "to_qkv", "qkv_proj", "Wqkv")


def fused_blocks(qualified_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row blocks of a fused q/k/v projection, recognised by its conventional name."""
    leaf = qualified_name.rsplit(".", 1)[-1]
    out = shape[0]
    if leaf in _FUSED_SUFFIXES and out % 3 == 0:
        return (out // 3,) * 3
    return ()
