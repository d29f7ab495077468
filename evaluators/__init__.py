"""Policy -> Metrics: pruning, importance criteria, recovery, measurement, the Ray pool.

Heavy optional pieces (ray, scikit-learn) are imported lazily by the modules that need them.
"""

from evaluators.compensation import CaPConfig, compensate
from evaluators.evaluate import evaluate, evaluate_model
from evaluators.importance import Importance, available_importances, make_importance, register_importance
from evaluators.latency_table import LatencyConfig, build_latency_table
from evaluators.metrics import Metrics, Objective, get_objective, register_objective
from evaluators.pool import EvaluatorPool, ensure_ray
from evaluators.prune import apply_policy
from evaluators.recover import available_recoveries, recover, register_recovery
from evaluators.settings import EvalSettings
from evaluators.tasks import Task, available_tasks, load_task, register_task

__all__ = [
    "CaPConfig", "EvalSettings", "EvaluatorPool", "Importance", "LatencyConfig", "Metrics", "Objective", "Task",
    "apply_policy", "available_importances", "available_recoveries", "available_tasks", "build_latency_table",
    "compensate", "ensure_ray", "evaluate", "evaluate_model", "get_objective", "load_task", "make_importance",
    "recover", "register_importance", "register_objective", "register_recovery", "register_task",
]
