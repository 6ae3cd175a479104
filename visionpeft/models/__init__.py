"""Model helpers: tiny configurations of every supported family (tests, benchmarks, demos) and the
tiny backbones pretrained by the project (``tiny("vit")``, ``tiny("convnet")``)."""
from visionpeft.models.configs import FAMILY_BUILDERS, build
from visionpeft.models.tiny import tiny

__all__ = ["FAMILY_BUILDERS", "build", "tiny"]
