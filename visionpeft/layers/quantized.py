"""Quantized linear layers as layer kinds: bitsandbytes ``Linear4bit`` (NF4, FP4) and ``Linear8bitLt``, and
torchao int8 linears (``quantize_(model, Int8WeightOnlyConfig())``: an ``nn.Linear`` whose weight is an ``Int8Tensor``).

A method sees the logical ``(out, in)`` weight in a float compute dtype, never the storage (packed uint8, int8), so
adapters are built in float32 (or the compute dtype). The base stays quantized and frozen:

- the activation path (LoRA, DoRA, FLoRA, NOLA, MoRA, α-LoRA on linear ops) runs the layer's own forward, i.e. its
  quantized kernel, and adds the adapter's branch;
- reading the weight (DoRA's norms, a weight path, ``vp.extract``) dequantizes it into a transient float tensor, tagged
  with the stored tensors it came from (``WEIGHT_SOURCE_ATTR``), so a cache keyed on it survives the re-reads;
- writing (``vp.merge``) dequantizes, adds and requantizes: lossy, so every write warns with its max abs error
  (:class:`RequantizationWarning`; :func:`requantization_summary` folds one operation's warnings into one). The
  layer keeps the stored state from before a merge (``snapshot``), so unmerging the last merge puts it back bit
  for bit instead of requantizing again.

Methods that need the weight's exact values (``Method.refuses_quantized``) are refused at attach. The libraries are
imported by nobody here: a model that holds their modules has imported them already.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from visionpeft.layers import kinds
from visionpeft.layers.kinds import WEIGHT_SOURCE_ATTR, LayerKind, Slot, rebuilt_on_backward


class RequantizationWarning(UserWarning):
    """A write into a quantized weight (a merge) was rounded to the storage's grid; ``error`` is the max abs
    difference between the weight asked for and the one stored, ``module`` the layer written."""

    def __init__(self, message: str, module: nn.Module | None = None, error: float = 0.0, kind: str = "") -> None:
        super().__init__(message)
        self.module, self.error, self.kind = module, error, kind


def _loaded(name: str):
    """The module ``name`` if it was imported already (a model holding its layers has imported it), else None."""
    return sys.modules.get(name)


class QuantizedLinearKind(LayerKind):
    """A linear layer with quantized weight storage: the slot is the logical (out, in) weight in the compute dtype."""

    single_input = True
    exact_weight = False

    # --- what each storage provides ---------------------------------------------------------------
    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        raise NotImplementedError

    def dequantized(self, module: nn.Module) -> torch.Tensor:
        """The weight the layer computes with, (out, in), floating point."""
        raise NotImplementedError

    def requantized(self, module: nn.Module, weight: torch.Tensor) -> Any:
        """A stored state (as :meth:`stored` returns it) holding ``weight`` (float32) quantized like the layer's."""
        raise NotImplementedError

    def stored(self, module: nn.Module) -> Any:
        """Everything the layer's weight is stored in, to put back with :meth:`store`."""
        raise NotImplementedError

    def store(self, module: nn.Module, state: Any) -> None:
        raise NotImplementedError

    def storage_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        raise NotImplementedError

    def describe(self, module: nn.Module) -> str:
        return self.name

    def check(self, module: nn.Module) -> None:
        """ValueError when the layer holds no quantized weight yet."""

    # --- the kind ---------------------------------------------------------------------------------
    def slot_names(self, module):
        return ["weight"]

    def parameter(self, module, slot):
        return module, "weight"

    def slot(self, module, slot, qualified_name=""):
        self.check(module)
        shape = (module.out_features, module.in_features)
        return Slot(label=slot, shape=shape, dtype=self.compute_dtype(module), device=self.storage_tensors(module)[0].device,
                    op="linear", blocks=kinds.fused_blocks(qualified_name, shape))

    @torch.no_grad()
    def read(self, module, slot):
        weight = self.dequantized(module).to(self.compute_dtype(module))
        setattr(weight, WEIGHT_SOURCE_ATTR, self.source(module))
        return weight

    def source(self, module: nn.Module) -> tuple:
        """Identifies the stored weight: a re-read of the same storage gives the same value."""
        return tuple((id(t), t.data_ptr(), t._version) for t in self.storage_tensors(module))

    @torch.no_grad()
    def write(self, module, slot, canonical):
        wanted = canonical.detach().float()
        self.store(module, self.requantized(module, wanted))
        error = float((self.dequantized(module).float() - wanted).abs().max()) if wanted.numel() else 0.0
        described = self.describe(module)
        warnings.warn(RequantizationWarning(
            f"writing into a quantized weight ({described}, {tuple(wanted.shape)}) dequantizes, adds and requantizes: "
            f"lossy, max abs error {error:.3g}", module=module, error=error, kind=described), stacklevel=4)

    def snapshot(self, module, slot):
        return self.stored(module)

    def restore(self, module, slot, snapshot):
        self.store(module, snapshot)

    def run(self, module, base_forward, args, kwargs, weights):
        """The weight path: x·(W + ΔW)ᵀ + b in the weight's (compute) dtype, returned in x's dtype."""
        x, weight = args[0], weights["weight"]
        bias = None if module.bias is None else module.bias.to(weight.dtype)
        with rebuilt_on_backward(weights.values()):
            return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


class Bnb4bitKind(QuantizedLinearKind):
    """bitsandbytes ``Linear4bit`` (``LinearNF4``, ``LinearFP4``): blockwise 4-bit codes in a ``Params4bit``."""

    name = "Linear4bit"

    def matches(self, module):
        bnb = _loaded("bitsandbytes.nn")
        return bnb is not None and isinstance(module, bnb.Linear4bit)

    def check(self, module):
        if not getattr(module.weight, "bnb_quantized", False) or module.weight.quant_state is None:
            raise ValueError(f"{type(module).__name__} holds no quantized weight yet (bitsandbytes quantizes it on "
                             f".to(device)); quantize the model before attaching")

    @staticmethod
    def _unpacked(module) -> tuple[torch.Tensor, Any]:
        """The packed codes and quant state in bitsandbytes' portable layout (its CPU inference layout undone on a
        copy: that conversion changes the state in place)."""
        weight = module.weight
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return data, state

    def compute_dtype(self, module):
        return module.compute_dtype or self._unpacked(module)[1].dtype

    def dequantized(self, module):
        from bitsandbytes.functional import dequantize_4bit

        data, state = self._unpacked(module)
        return dequantize_4bit(data, state)

    def requantized(self, module, weight):
        import bitsandbytes as bnb

        old = module.weight
        dtype = self._unpacked(module)[1].dtype
        codes, state = bnb.functional.quantize_4bit(
            weight.to(dtype).contiguous(), blocksize=old.blocksize, compress_statistics=old.compress_statistics,
            quant_type=old.quant_type, quant_storage=old.quant_storage)
        return bnb.nn.Params4bit(codes, requires_grad=False, quant_state=state, blocksize=old.blocksize,
                                 compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                 quant_storage=old.quant_storage, module=module, bnb_quantized=True)

    def stored(self, module):
        return module.weight  # writes replace the parameter, so this one stays as it is

    def store(self, module, state):
        module.weight = state
        module.quant_state = state.quant_state

    def storage_tensors(self, module):
        return [module.weight]

    def describe(self, module):
        return f"bitsandbytes {type(module).__name__} {module.weight.quant_type}"


class Bnb8bitKind(QuantizedLinearKind):
    """bitsandbytes ``Linear8bitLt`` (LLM.int8(), ``has_fp16_weights=False``): int8 rows with one scale each (SCB),
    kept on the weight until the first forward moves them into the layer's matmul state."""

    name = "Linear8bitLt"

    def matches(self, module):
        bnb = _loaded("bitsandbytes.nn")
        return bnb is not None and isinstance(module, bnb.Linear8bitLt)

    def check(self, module):
        if module.weight.dtype != torch.int8 or self._scales(module) is None:
            raise ValueError(f"{type(module).__name__} holds no int8 weight (has_fp16_weights=True keeps float weights, "
                             f"and bitsandbytes quantizes on .to(device)); quantize the model with has_fp16_weights=False")

    @staticmethod
    def _scales(module) -> torch.Tensor | None:
        scales = getattr(module.weight, "SCB", None)
        return scales if scales is not None else module.state.SCB

    def compute_dtype(self, module):
        bias = module.bias
        return bias.dtype if bias is not None and bias.dtype.is_floating_point else torch.float32

    def dequantized(self, module):
        from bitsandbytes.functional import int8_vectorwise_dequant

        return int8_vectorwise_dequant(module.weight.data, self._scales(module))

    def requantized(self, module, weight):
        import bitsandbytes as bnb

        codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
        return (weight, codes, scales), None, None  # the first forward moves the codes and scales into module.state

    def stored(self, module):
        weight = module.weight
        return (weight, getattr(weight, "CB", None), getattr(weight, "SCB", None)), module.state.CB, module.state.SCB

    def store(self, module, state):
        (weight, codes, scales), state_codes, state_scales = state
        module.weight = weight
        weight.CB, weight.SCB = codes, scales
        module.state.CB, module.state.SCB = state_codes, state_scales
        if state_codes is not None:
            weight.data = state_codes

    def storage_tensors(self, module):
        return [module.weight, self._scales(module)]

    def describe(self, module):
        return f"bitsandbytes {type(module).__name__} int8"


class TorchAOInt8Kind(QuantizedLinearKind):
    """An ``nn.Linear`` whose weight is a torchao ``Int8Tensor`` (int8 ``qdata`` and per-row, per-group or per-tensor
    ``scale``): its forward dispatches ``F.linear`` to torchao's int8 kernel."""

    name = "torchao Int8Tensor"

    @staticmethod
    def _int8_tensor():
        module = _loaded("torchao.quantization.quantize_.workflows.int8.int8_tensor")
        return None if module is None else module.Int8Tensor

    def matches(self, module):
        cls = self._int8_tensor()
        return cls is not None and isinstance(module, nn.Linear) and isinstance(module._parameters.get("weight"), cls)

    def compute_dtype(self, module):
        return module.weight.dtype

    def dequantized(self, module):
        return module.weight.dequantize()

    def requantized(self, module, weight):
        from torchao.quantization.granularity import PerGroup, PerRow, PerTensor
        from torchao.quantization.quant_primitives import MappingType

        old = module.weight
        out, inner = old.shape[-2:]
        block = list(old.block_size)[-2:]
        granularity = PerTensor() if block == [out, inner] else PerRow() if block == [1, inner] else PerGroup(block[-1])
        asymmetric = old.zero_point is not None and bool(old.zero_point.any())
        new = type(old).from_hp(weight.to(old.dtype), granularity,
                                mapping_type=MappingType.ASYMMETRIC if asymmetric else MappingType.SYMMETRIC,
                                act_quant_kwargs=old.act_quant_kwargs, reduce_range=old.reduce_range)
        return nn.Parameter(new, requires_grad=False)

    def stored(self, module):
        return module.weight

    def store(self, module, state):
        module.weight = state

    def storage_tensors(self, module):
        return [module.weight.qdata, module.weight.scale]

    def describe(self, module):
        return "torchao Int8Tensor"


#: most specific first; placed before the plain Linear kind (bitsandbytes' layers are nn.Linear subclasses)
QUANTIZED_KINDS: tuple[QuantizedLinearKind, ...] = (Bnb4bitKind(), Bnb8bitKind(), TorchAOInt8Kind())


def quantized_storage(tensor: Any) -> str | None:
    """What quantized storage ``tensor`` is (a bitsandbytes or torchao parameter), None for a plain tensor."""
    bnb = _loaded("bitsandbytes.nn")
    if bnb is not None and isinstance(tensor, (bnb.Params4bit, bnb.Int8Params)) and not tensor.dtype.is_floating_point:
        return f"bitsandbytes {type(tensor).__name__}"
    base = _loaded("torchao.utils")
    if base is not None and isinstance(tensor, getattr(base, "TorchAOBaseTensor", ())):
        return f"torchao {type(tensor).__name__}"
    return None


@contextlib.contextmanager
def requantization_summary(model: nn.Module, operation: str) -> Iterator[None]:
    """Within, the per-layer :class:`RequantizationWarning` of writes into quantized weights are collected and
    issued again as one warning: how many layers, and the largest error with its layer's name."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    lossy = [w.message for w in caught if isinstance(w.message, RequantizationWarning)]
    for other in caught:
        if not isinstance(other.message, RequantizationWarning):
            warnings.warn_explicit(other.message, other.category, other.filename, other.lineno, source=other.source)
    if lossy:
        names = {id(m): n for n, m in model.named_modules()}
        worst = max(lossy, key=lambda w: w.error)
        storages = ", ".join(sorted({w.kind for w in lossy}))
        warnings.warn(RequantizationWarning(
            f"{operation} wrote into {len(lossy)} quantized weight(s) ({storages}) by dequantizing, adding and "
            f"requantizing: lossy, max abs error {worst.error:.3g} (at {names.get(id(worst.module), '?')!r})",
            module=worst.module, error=worst.error, kind=storages), stacklevel=3)
