"""Quantized linear layers as layer kinds, what they share: bitsandbytes ``Linear4bit`` (NF4, FP4) and
``Linear8bitLt``, and torchao int8 linears (``quantize_(model, Int8WeightOnlyConfig())``: an ``nn.Linear`` whose
weight is an ``Int8Tensor``). Each storage's own kind is in ``quantized_storages.py``.

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


def loaded_module(name: str):
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



def quantized_storage(tensor: Any) -> str | None:
    """What quantized storage ``tensor`` is (a bitsandbytes or torchao parameter), None for a plain tensor."""
    bnb = loaded_module("bitsandbytes.nn")
    if bnb is not None and isinstance(tensor, (bnb.Params4bit, bnb.Int8Params)) and not tensor.dtype.is_floating_point:
        return f"bitsandbytes {type(tensor).__name__}"
    base = loaded_module("torchao.utils")
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
