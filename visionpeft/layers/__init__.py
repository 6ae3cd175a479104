"""Layer kinds and the adapted-layer wrapper."""
from visionpeft.layers.adapted import AdaptedLayer, is_adapted
from visionpeft.layers.kinds import KINDS, LayerKind, Slot, kind_of

__all__ = ["AdaptedLayer", "is_adapted", "KINDS", "LayerKind", "Slot", "kind_of"]
