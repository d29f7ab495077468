"""Pruning policies without search: uniform pruning and Torch-Pruning's global pruning.

These are what a user of Torch-Pruning gets with no search at all, used as baselines in the
benchmarks and as the first proposals of the searchers (option ``heuristic_start``).

* ``uniform``: every group at one grid ratio, the largest within the FLOPs target.
* ``global_magnitude``: ``MetaPruner(global_pruning=True)`` with
  ``MagnitudeImportance(p=2, normalizer="mean")``: each group's group-L2 channel scores are
  divided by their mean, every channel of every group is ranked together, and the
  ``k`` lowest-scoring channels are removed.
* ``global_lamp``: the same with ``LAMPImportance`` (scores normalised by the sum of the
  scores at least as large in their group).

The channel scores are Torch-Pruning's own importance objects applied to the dependency
group of each of the space's groups, exactly as ``MetaPruner`` scores them; the global
threshold is then applied here, so only the space's groups are pruned and each group keeps
between ``ratio_min`` and ``ratio_max`` of its channels (Torch-Pruning's
``max_pruning_ratio``). ``k`` is bisected until the policy's exact FLOPs ratio
(``space.flops_ratio``) is at or below the target; the least pruning that meets it wins.
Each group's ratio is its kept channels / channels, snapped to the space's grid
(``on_grid``) — snapping is monotone, so the bisection still holds the target. The policy's
channel criterion is ``l2`` when the space offers it (how Torch-Pruning picks channels
within a group under both scores), else the space's first method. Deterministic: no
randomness anywhere.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch_pruning as tp

from evaluators.prune import unit_scores
from spaces.checks import check_int
from spaces.groups import build_graph, root_pruning_group
from spaces.policy import Policy
from spaces.registry import Registry
from spaces.space import SearchSpace

#: ``fn(space, targets, *, model, example_inputs, on_grid) -> [Policy per target]``
Heuristic = Callable[..., list[Policy]]
HEURISTICS: Registry[Heuristic] = Registry("heuristic")
CRITERION = "l2"


def available_heuristics() -> tuple[str, ...]:
    return HEURISTICS.names()


def heuristic_policies(name: str, space: SearchSpace, targets: Sequence[float], *, model: Any = None,
                       example_inputs: Any = None, on_grid: bool = True) -> list[Policy]:
    """The ``name`` heuristic's policy at each FLOPs-ratio target (``ValueError`` for a target
    the space cannot reach, or an unknown name)."""
    fn = HEURISTICS.get(name)
    for t in targets:
        _check_target(space, t)
    return fn(space, list(targets), model=model, example_inputs=example_inputs, on_grid=on_grid)


def _check_target(space: SearchSpace, target: float) -> None:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
        raise ValueError(f"FLOPs-ratio target must be a number in (0, 1], got {target!r}")
    floor = space.min_flops_ratio
    if target < floor - 1e-12:
        raise ValueError(f"FLOPs-ratio target {target:g} is below what the space can reach "
                         f"({floor:.4f}: every group at ratio_min {space.ratio_min})")


def _criterion(space: SearchSpace) -> str:
    return CRITERION if CRITERION in space.methods else space.methods[0]


@HEURISTICS.register("uniform")
def uniform(space: SearchSpace, targets: Sequence[float], *, on_grid: bool = True, **_: Any) -> list[Policy]:
    """Every group at the largest grid ratio (or, off the grid, the largest ratio in the
    space's range) whose FLOPs ratio is within each target."""
    out = []
    for t in targets:
        if on_grid:
            ratio = max(r for r in space.levels if space.flops_ratio(space.uniform(r)) <= t + 1e-12)
        else:
            ratio = min(space.ratio_max, max(space.ratio_min, space.uniform_ratio_within(t)))
        out.append(space.uniform(ratio))
    return out


def group_scores(space: SearchSpace, model: Any, example_inputs: Any, importance: Any) -> dict[str, np.ndarray]:
    """Torch-Pruning ``importance`` of every channel of each of the space's groups (on a copy
    of ``model`` in eval mode; the model is not changed)."""
    if model is None or example_inputs is None:
        raise ValueError("global pruning heuristics need the base model and its example inputs")
    work = copy.deepcopy(model).eval()
    modules = dict(work.named_modules())
    ignored = [modules[n] for n in space.config.ignored if n in modules]
    graph = build_graph(work, example_inputs, ignored)
    scores = {}
    with torch.no_grad():
        for g in space.groups:
            imp = importance(root_pruning_group(graph, modules[g.name], range(g.width)))
            if imp is None:
                raise ValueError(f"Torch-Pruning gave no importance for group {g.name!r}")
            imp = imp.detach().float().cpu().reshape(-1, g.width).mean(dim=0)  # channel groups averaged
            # one score per unit (a whole head or normalisation group), on the channels' scale
            scores[g.name] = (unit_scores(imp, g) / g.unit).numpy().astype(np.float64)
    return scores


class GlobalRanking:
    """Channel scores of every group ranked together; ``policy(k)`` removes the ``k`` lowest."""

    def __init__(self, space: SearchSpace, scores: dict[str, np.ndarray], on_grid: bool = True) -> None:
        self.space, self.scores, self.on_grid = space, scores, on_grid
        self.all = np.sort(np.concatenate([scores[n] for n in space.group_names]))
        self.method = _criterion(space)

    def policy(self, k: int) -> Policy:
        """Torch-Pruning's global rule: channels scoring <= the k-th lowest score are removed
        (none when ``k`` is 0); each group's ratio clipped to the space's range."""
        ratios = {}
        for g in self.space.groups:
            kept = g.channels if k <= 0 else int(np.sum(self.scores[g.name] > self.all[k - 1]))
            ratio = min(self.space.ratio_max, max(self.space.ratio_min, kept / g.channels))
            ratios[g.name] = self.space.snap(ratio) if self.on_grid else ratio
        return Policy(ratios=ratios, method=self.method)

    def within(self, target: float) -> Policy:
        """The policy of the smallest ``k`` whose FLOPs ratio is <= ``target`` (bisection: FLOPs
        fall as ``k`` grows)."""
        lo, hi = 0, len(self.all)  # invariant: policy(hi) meets the target
        if self.space.flops_ratio(self.policy(hi)) > target + 1e-12:
            raise ValueError(f"FLOPs-ratio target {target:g} is below what global pruning reaches in this space")
        while lo < hi:
            mid = (lo + hi) // 2
            if self.space.flops_ratio(self.policy(mid)) <= target + 1e-12:
                hi = mid
            else:
                lo = mid + 1
        return self.policy(hi)


def _global(importance: Callable[[], Any]) -> Heuristic:
    def run(space: SearchSpace, targets: Sequence[float], *, model: Any = None, example_inputs: Any = None,
            on_grid: bool = True) -> list[Policy]:
        ranking = GlobalRanking(space, group_scores(space, model, example_inputs, importance()), on_grid)
        return [ranking.within(t) for t in targets]
    return run


HEURISTICS.add("global_magnitude", _global(lambda: tp.importance.MagnitudeImportance(p=2, normalizer="mean")))
HEURISTICS.add("global_lamp", _global(lambda: tp.importance.LAMPImportance(p=2)))


# -- heuristic starts (searcher option ``heuristic_start``) -------------------------------------
def check_heuristic_start(name: str, value: Any) -> dict[str, int]:
    """``value`` as ``{heuristic: count}`` (a TOML table such as ``{global_lamp = 4}``);
    one-line ``ValueError`` naming option ``name`` otherwise."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a table of heuristic name -> count (e.g. {{global_lamp = 4}}), got {value!r}")
    out = {}
    for key, count in value.items():
        if key not in HEURISTICS:
            raise ValueError(f"{name}: unknown heuristic {key!r} (known: {', '.join(available_heuristics())})")
        out[str(key)] = check_int(f"{name}.{key}", count, 1)
    return out


def spread_targets(space: SearchSpace, n: int, max_flops_ratio: float | None) -> list[float]:
    """``n`` FLOPs-ratio targets in equal steps from ``max_flops_ratio`` (1 when None) down
    towards the smallest model the space can express, largest first; the smallest model
    itself is left out (there every heuristic is the same policy: every group at ratio_min)."""
    lo = space.min_flops_ratio
    hi = max(lo, 1.0 if max_flops_ratio is None else min(1.0, max_flops_ratio))
    return [hi - i * (hi - lo) / n for i in range(n)]


def start_policies(spec: Mapping[str, int], space: SearchSpace, max_flops_ratio: float | None,
                   task: Any = None) -> list[Policy]:
    """Each heuristic of ``spec`` at its count of targets spread over the FLOPs budget, on the
    space's grid, in ``spec``'s order, each distinct policy once. The global ones read the
    base model of ``task`` (an ``evaluators.tasks.Task``)."""
    if not spec:
        return []
    if task is None and set(spec) != {"uniform"}:
        raise ValueError("heuristic_start with global pruning needs the study's task (its base model)")
    model = None if task is None else task.base_model()
    inputs = None if task is None else task.example_inputs
    out: list[Policy] = []
    for name, n in spec.items():
        for policy in heuristic_policies(name, space, spread_targets(space, n, max_flops_ratio), model=model,
                                         example_inputs=inputs):
            if policy not in out:
                out.append(policy)
    return out
