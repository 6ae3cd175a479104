"""Adapter methods, one file each; importing a file registers its method."""
from visionpeft.methods import dora, flora, lora, map, sara, snella, svd  # noqa: F401
from visionpeft.methods.base import Method, Option, get_method, register, registered_names

__all__ = ["Method", "Option", "get_method", "register", "registered_names"]
