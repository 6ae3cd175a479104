"""Training: recipes (schema, overrides), the accelerate runner, and sweeps over benchmark tasks."""
from visionpeft.training.recipe import load_recipe, validate
from visionpeft.training.runner import evaluate_adapter, train

__all__ = ["load_recipe", "validate", "train", "evaluate_adapter"]
