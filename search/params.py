"""Optuna's view of a search space: one distribution per param.

Param names are the space's (``SearchSpace.to_params``): one float per group on the ratio
grid, ``method`` (or ``<group>.method``) and ``recovery`` categoricals when there is a
choice. Kept here so ``spaces`` does not depend on Optuna.
"""

from __future__ import annotations

import optuna.distributions as od

from spaces.space import RECOVERY_PARAM, SearchSpace


def distributions(space: SearchSpace) -> dict[str, od.BaseDistribution]:
    """Optuna distributions of ``space``'s params (the same names every searcher records)."""
    dists: dict[str, od.BaseDistribution] = {}
    for n in space.group_names:
        if space.ratio_min == space.ratio_max:
            dists[n] = od.CategoricalDistribution([space.ratio_min])
        else:
            dists[n] = od.FloatDistribution(space.ratio_min, space.ratio_max, step=space.ratio_step)
    for slot in space.method_slots():
        dists[slot] = od.CategoricalDistribution(list(space.methods))
    if len(space.recoveries) > 1:
        dists[RECOVERY_PARAM] = od.CategoricalDistribution(list(space.recoveries))
    return dists
