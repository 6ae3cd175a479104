"""Model helpers: tiny configurations of every supported family (tests, benchmarks, demos)."""
from visionpeft.models.configs import FAMILY_BUILDERS, build

__all__ = ["FAMILY_BUILDERS", "build"]
