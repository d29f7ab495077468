"""Budget fill: grow a policy to the FLOPs level above it, keeping its shape.

A searcher proposes ratios on the space's grid, so its policies land anywhere below a
FLOPs budget: on shapes a TPE study's best model at <= 15% FLOPs sat at 13.2-14.2% while
uniform pruning's continuous ratio sits at 14.8%, and near such budgets every percent of
FLOPs is worth points of accuracy (uniform at 13.4% fine-tuned to 65.1-65.9%, at 14.8% to
67.6-68.2%; `benchmarks/results/finetune_lengths/`). With ``[fill]`` every proposal is
projected onto the budget before it is evaluated: all its ratios are multiplied by the one
factor that brings its FLOPs ratio up to the smallest level at or above it (bisection; FLOPs rise
monotonically with the factor), each capped at the space's ``ratio_max``. The searcher
still chooses the *shape* (how the budget is shared between groups); the fill spends the
whole budget. A policy above every level is left as it is.

Filled ratios are off the grid (floored to 6 decimals, so the FLOPs stay within the level).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spaces.checks import check_keys
from spaces.policy import Policy

_DECIMALS = 6
_BISECTION_STEPS = 40


@dataclass(frozen=True)
class FillConfig:
    """``[fill]``: the FLOPs ratio levels every proposal is grown to.

    ``levels = []`` (the default when the table is present) means the study's
    ``max_flops_ratio`` constraint, filled in by the study config."""

    levels: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        levels = self.levels
        if not isinstance(levels, (list, tuple)):
            raise ValueError(f"levels must be a list of FLOPs ratios in (0, 1], got {levels!r}")
        for level in levels:
            if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level <= 1.0:
                raise ValueError(f"levels must be FLOPs ratios in (0, 1], got {level!r}")
        if list(levels) != sorted(set(levels)):
            raise ValueError(f"levels must be strictly increasing, got {list(levels)}")
        object.__setattr__(self, "levels", tuple(float(v) for v in levels))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FillConfig":
        check_keys("[fill]", data, ("levels",))
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return {"levels": list(self.levels)}

    def levels_under(self, max_flops_ratio: float | None) -> tuple[float, ...]:
        """Its own levels, else the study's FLOPs constraint (``()`` when neither is set)."""
        return self.levels or ((max_flops_ratio,) if max_flops_ratio is not None else ())


def _floored(ratio: float) -> float:
    return math.floor(ratio * 10**_DECIMALS) / 10**_DECIMALS


@dataclass(frozen=True)
class BudgetFill:
    """The projection of ``[fill]`` over one space (``project(policy) -> policy``)."""

    space: Any                 # spaces.space.SearchSpace: its cost model and ratio_max
    levels: tuple[float, ...]  # FLOPs ratios, increasing

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("budget fill needs at least one FLOPs level")

    def target(self, flops_ratio: float) -> float | None:
        """The level ``flops_ratio`` is grown to (None: above every level)."""
        return next((lv for lv in self.levels if flops_ratio <= lv + 1e-12), None)

    def scaled(self, policy: Policy, factor: float) -> Policy:
        cap = self.space.ratio_max
        ratios = {n: max(r, min(cap, _floored(r * factor))) for n, r in policy.ratios.items()}
        full = {n: 1.0 for n in self.space.group_names if n not in ratios}  # unnamed groups keep 1.0
        return Policy(ratios={**full, **ratios}, method=policy.method, recovery=policy.recovery)

    def project(self, policy: Policy) -> Policy:
        """``policy`` grown to its level: the largest common factor whose FLOPs ratio stays
        within it (``policy`` itself when above every level or already as large as it can be)."""
        level = self.target(self.space.flops_ratio(policy))
        if level is None:
            return policy
        smallest = min(policy.ratios.values(), default=1.0)
        hi = max(1.0, self.space.ratio_max / smallest)   # every ratio at the cap
        if self.space.flops_ratio(self.scaled(policy, hi)) <= level:
            return self.scaled(policy, hi)
        lo = 1.0
        for _ in range(_BISECTION_STEPS):
            mid = (lo + hi) / 2
            if self.space.flops_ratio(self.scaled(policy, mid)) <= level:
                lo = mid
            else:
                hi = mid
        filled = self.scaled(policy, lo)
        return policy if filled.key() == policy.key() else filled
