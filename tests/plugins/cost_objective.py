"""An objective in one file: the mean of the FLOPs and parameter ratios, minimised."""

from __future__ import annotations

from evaluators.metrics import MINIMIZE, Metrics, Objective, register_objective


def mean_cost(metrics: Metrics) -> float | None:
    if metrics.flops_ratio is None or metrics.params_ratio is None:
        return None
    return (metrics.flops_ratio + metrics.params_ratio) / 2


COST = register_objective("ext_mean_cost", Objective(MINIMIZE, read=mean_cost))
