"""Policy -> Metrics: pruning, importance criteria, recovery, measurement, the Ray pool."""

from evaluators.importance import Importance, available_importances, make_importance, register_importance
from evaluators.metrics import Metrics
from evaluators.prune import apply_policy

__all__ = ["Importance", "Metrics", "apply_policy", "available_importances", "make_importance", "register_importance"]
