"""Adapter methods, one file each; importing a file registers its method.

``visionpeft.methods`` is this package, and calling it, ``visionpeft.methods()``, returns every registered
method name (aliases included): the package of methods is also the list of them.
"""
import sys
import types

from visionpeft.methods import alpha_lora, dora, flora, lora, map, mora, nola, sara, snella, svd  # noqa: F401
from visionpeft.methods.base import Method, Option, get_method, register, registered_names

__all__ = ["Method", "Option", "get_method", "register", "registered_names"]


class _CallablePackage(types.ModuleType):
    def __call__(self) -> list[str]:
        """Every registered method name (aliases included)."""
        return registered_names()


sys.modules[__name__].__class__ = _CallablePackage
