"""What every method is: a weight delta for one frozen weight slot.

A method instance is built from a :class:`~visionpeft.layers.kinds.Slot` (the weight's canonical
shape ``(out, in_per_group, *kernel)``, dtype, device and the functional op that consumes it) and
its options. It never sees the model or the layer module.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
from torch import nn

from visionpeft.layers.kinds import Slot

_REGISTRY: dict[str, type["Method"]] = {}
_ALIASES: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class Option:
    """One hyper-parameter of a method: its default, its check, and one line of help."""

    default: Any
    check: Callable[[Any], bool]
    allowed: str
    help: str = ""

    def validate(self, method: str, name: str, value: Any) -> Any:
        if not self.check(value):
            raise ValueError(f"{method}: option {name}={value!r} is invalid; allowed: {self.allowed}")
        return value


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def probability(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0


def positive_number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)


def boolean(value: Any) -> bool:
    return isinstance(value, bool)


class Method(nn.Module):
    """Base class of every adapter method.

    Subclasses set ``name`` and ``options`` and implement :meth:`delta`. They may also provide
    :meth:`uses_activation_path`/:meth:`add_output_delta` (an activation path, used when cheaper than building the delta),
    :meth:`gradient_from_output`/:meth:`tap_output` (a weight path whose gradient skips the dense weight gradient),
    :meth:`penalty` and the model-wide hooks :meth:`prepare`, :meth:`model_penalty` and
    :meth:`model_step`, which receive every instance of the method but never the model.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[dict[str, Option]] = {}
    #: adapt a fused projection (q/k/v stacked in one weight) per block instead of whole
    split_fused: ClassVar[bool] = False
    #: ΔW is a function of the base weight too (DoRA's and MAP's normalisations). The layer then calls
    #: ``delta(weight)``, ``add_output_delta(x, out, slot, weight, bias)`` (only where the method is the sole
    #: adapter on the slot, so ``out`` is W0·x + b) and merges through ``merged_weight(weight, scale)`` /
    #: ``unmerged_weight(merged, scale)`` (float32), with ``weight`` the slot's weight as the layer holds it.
    #: A method whose activation path changes the bias too defines ``folded_bias(bias, slot, scale, merge)``,
    #: the bias after merging or unmerging (asked only on single-input layers).
    reads_base: ClassVar[bool] = False

    def __init__(self, slot: Slot, **options: Any) -> None:
        super().__init__()
        self.slot_shape = tuple(slot.shape)
        self.config = dict(options)

    # --- the delta -------------------------------------------------------------------------
    def delta(self) -> torch.Tensor:
        """The weight change, shaped like the slot's canonical weight, in the adapter's dtype."""
        raise NotImplementedError

    def uses_activation_path(self, slot: Slot) -> bool:
        """True when :meth:`add_output_delta` is cheaper than running the op with W + ΔW."""
        return False

    def add_output_delta(self, x: torch.Tensor, out: torch.Tensor, slot: Slot) -> torch.Tensor:
        """``out`` (the base op's output for ``x``, owned by the caller) plus this adapter's
        contribution; may add in place."""
        raise NotImplementedError

    def low_rank_branch(self, slot: Slot) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(down (rank × in), up (out × rank), scale)``, the live parameters, when :meth:`add_output_delta` on this
        linear ``slot`` adds exactly ``scale · up · down · x``; None otherwise. ``vp.routing`` then runs the
        branches of a mixed batch's adapters as one batched product per layer."""
        return None

    def gradient_from_output(self, slot: Slot) -> bool:
        """True when the op should run with :meth:`effective_weight` as a constant and :meth:`tap_output`
        give the parameters their gradient from the op's input and output gradient (only asked where the
        method is the sole adapter on a single-input slot)."""
        return False

    def tap_output(self, x: torch.Tensor, out: torch.Tensor, slot: Slot, rows: slice) -> torch.Tensor:
        """``out`` (the op's output for ``x``, owned by the caller) unchanged, routed so that backward gives
        this method's parameters their gradient; ``rows`` are this method's output features in ``out``."""
        raise NotImplementedError

    def fit_delta(self, delta: torch.Tensor) -> None:
        """Set the parameters so that :meth:`delta` approximates ``delta`` (used by ``vp.extract``)."""
        raise NotImplementedError(f"{self.name} cannot be fitted to a weight difference")

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight the layer should run with; additive methods return ``weight + delta``."""
        return weight + self.delta().to(weight.dtype)

    # --- training hooks --------------------------------------------------------------------
    def penalty(self) -> torch.Tensor | None:
        return None

    @classmethod
    def prepare(cls, slots: Sequence[tuple[str, Slot, torch.Tensor]], options: dict[str, Any]) -> list[dict[str, Any]]:
        """Per-slot options, computed once from every targeted (label, slot, weight) before any
        instance is built. Global choices (a density threshold over all layers) go here."""
        return [dict(options) for _ in slots]

    @classmethod
    def refuses_quantized(cls, options: dict[str, Any]) -> str:
        """Why this method, with these (resolved) options, cannot adapt a weight stored quantized (reads dequantize,
        writes requantize: no exact values); empty when it can. Asked at attach, before anything changes."""
        return ""

    @classmethod
    def trains_bias(cls, options: dict[str, Any]) -> bool:
        """Whether the targeted layers' biases train with this adapter (and are saved with it)."""
        return False

    @classmethod
    def model_penalty(cls, instances: Sequence["Method"]) -> torch.Tensor | None:
        terms = [p for p in (m.penalty() for m in instances) if p is not None]
        return torch.stack([t.float() for t in terms]).sum() if terms else None

    @classmethod
    def model_step(cls, instances: Sequence["Method"], step: int, total_steps: int) -> None:
        return None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to :func:`visionpeft.attach` by its name."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    for key in (cls.name, *cls.aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"method name {key!r} is already registered")
    _REGISTRY[cls.name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    return cls


def registered_names() -> list[str]:
    return sorted(_REGISTRY) + sorted(_ALIASES)


def get_method(name: str) -> type[Method]:
    if not isinstance(name, str) or (name not in _REGISTRY and name not in _ALIASES):
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(registered_names())}")
    return _REGISTRY[_ALIASES.get(name, name)]


def resolve_options(cls: type[Method], given: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and every value checked; unknown names are an error."""
    unknown = sorted(set(given) - set(cls.options))
    if unknown:
        raise ValueError(
            f"{cls.name}: unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(sorted(cls.options)) or '(none)'}"
        )
    resolved = {}
    for key, option in cls.options.items():
        value = given.get(key, option.default)
        resolved[key] = option.validate(cls.name, key, value)
    return resolved


def kaiming_uniform_(tensor: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init (a=sqrt(5)), on a 2-D (rows, fan_in) view."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """Adapters train in float32 even on half-precision bases (as PEFT does by default)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def iter_instances(modules: Iterable[nn.Module]) -> Iterable[Method]:
    for module in modules:
        if isinstance(module, Method):
            yield module
