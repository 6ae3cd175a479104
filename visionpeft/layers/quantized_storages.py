"""The quantized storages visionpeft adapts, each a :class:`~visionpeft.layers.quantized.QuantizedLinearKind`:
bitsandbytes ``Linear4bit`` (NF4, FP4) and ``Linear8bitLt``, and torchao ``Int8Tensor`` linears. Each says how its
storage dequantizes, requantizes and is put back; the shared behaviour (slots, reads, lossy writes) is in
``quantized.py``. A kind matches only when the model's own import has loaded the library."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from visionpeft.layers.quantized import QuantizedLinearKind, loaded_module

class Bnb4bitKind(QuantizedLinearKind):
    """bitsandbytes ``Linear4bit`` (``LinearNF4``, ``LinearFP4``): blockwise 4-bit codes in a ``Params4bit``."""

    name = "Linear4bit"

    def matches(self, module):
        bnb = loaded_module("bitsandbytes.nn")
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
        bnb = loaded_module("bitsandbytes.nn")
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
        module = loaded_module("torchao.quantization.quantize_.workflows.int8.int8_tensor")
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
