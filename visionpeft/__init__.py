"""visionpeft: parameter-efficient fine-tuning for vision and diffusion models.

>>> import visionpeft as vp
>>> vp.attach(model, "lora", rank=8)          # doctest: +SKIP
"""
__version__ = "0.1.0"

from visionpeft import methods  # the subpackage; vp.methods() lists the registered names
from visionpeft.by_name import adapters, delete, disabled, merge, set_active, unmerge
from visionpeft.combine import combine
from visionpeft.core import attach, detach, regularization, step, trainable_parameters
from visionpeft.targeting import targets
from visionpeft.extract import extract
from visionpeft.io import load, save
from visionpeft.routing import routing
from visionpeft.sparsity import sparsity_report
from visionpeft.summary import summary

__all__ = [
    "__version__", "methods", "attach", "trainable_parameters", "summary", "merge", "unmerge", "detach",
    "save", "load", "regularization", "step", "extract", "sparsity_report",
    "adapters", "set_active", "disabled", "delete", "combine", "routing", "targets",
]
