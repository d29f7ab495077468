"""SpaceConfig (what a space offers) and SearchSpace: channel groups x a ratio grid x methods.

The one place that knows how a policy maps to Optuna parameters, to a GA genome and to
kept channel counts. Param names are the group names, plus ``method`` (or
``<group>.method`` with ``method_per_group``) and ``recovery`` when recoveries are
searched, so every searcher's trials look alike in optuna-dashboard.
"""

from __future__ import annotations

import math
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spaces.checks import check_bool, check_int, check_number, check_str_list, from_mapping
from spaces.cost import Cost, CostModel
from spaces.groups import ChannelGroup, check_keeps_a_head, discover_groups
from spaces.policy import Policy

METHOD_PARAM = "method"
RECOVERY_PARAM = "recovery"


def kept_channels(channels: int, ratio: float, round_to: int = 1) -> int:
    """Channels a group of ``channels`` keeps at remaining ``ratio``: >= 1 (>= round_to)."""
    kept = int(round(ratio * channels))
    if round_to > 1:
        kept = int(round(kept / round_to)) * round_to
    return max(min(round_to, channels), 1, min(kept, channels))


@dataclass(frozen=True)
class SpaceConfig:
    """What a search space offers: the ratio grid, pruning methods, recoveries, rounding.

    ``ratio_min``..``ratio_max`` (remaining fractions, in (0, 1]) in steps of ``ratio_step``;
    ``methods`` (importance criteria, one per policy or, with ``method_per_group``, one per
    group) and ``recoveries`` (searched when more than one) are registry names, checked by
    the layer that knows the registries (``search.config``). ``round_to`` rounds kept channel
    counts; ``ignored`` names modules whose channels are never pruned.
    """

    ratio_min: float = 0.2
    ratio_max: float = 1.0
    ratio_step: float = 0.05
    methods: tuple[str, ...] = ("l1",)
    method_per_group: bool = False
    recoveries: tuple[str, ...] = ()
    round_to: int = 1
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in ("ratio_min", "ratio_max", "ratio_step"):
            object.__setattr__(self, key, check_number(key, getattr(self, key)))
        if not 0.0 < self.ratio_min <= 1.0 or not 0.0 < self.ratio_max <= 1.0:
            raise ValueError(f"ratio range must lie in (0, 1], got [{self.ratio_min}, {self.ratio_max}]")
        if self.ratio_min > self.ratio_max:
            raise ValueError(f"ratio range is inverted: ratio_min {self.ratio_min} > ratio_max {self.ratio_max}")
        if not self.ratio_step > 0:
            raise ValueError(f"ratio_step must be > 0, got {self.ratio_step}")
        span = (self.ratio_max - self.ratio_min) / self.ratio_step
        if abs(span - round(span)) > 1e-6:
            raise ValueError(
                f"ratio_step {self.ratio_step} does not divide the range [{self.ratio_min}, {self.ratio_max}]"
            )
        object.__setattr__(self, "methods", check_str_list("methods", self.methods))
        if not self.methods:
            raise ValueError("at least one pruning method is required")
        check_bool("method_per_group", self.method_per_group)
        object.__setattr__(self, "recoveries", check_str_list("recoveries", self.recoveries))
        check_int("round_to", self.round_to, 1)
        object.__setattr__(self, "ignored", check_str_list("ignored", self.ignored))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SpaceConfig":
        """From a ``[space]`` table; unknown keys are errors."""
        return from_mapping(cls, data, "[space]")


@dataclass(frozen=True)
class SearchSpace:
    """What searchers may propose (``groups`` x ``config``), and what a proposal costs."""

    groups: tuple[ChannelGroup, ...]
    config: SpaceConfig = field(default_factory=SpaceConfig)
    cost_model: CostModel | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        if not isinstance(self.config, SpaceConfig):
            raise ValueError(f"config must be a SpaceConfig, got {self.config!r}")
        if not self.groups:
            raise ValueError("search space has no prunable channel group")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError("duplicate group names in search space")

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: Any, example_inputs: Any, config: SpaceConfig | None = None,
                   **options: Any) -> "SearchSpace":
        """Discover ``model``'s groups and measure its cost model (``example_inputs``: batch 1).

        ``options`` are ``SpaceConfig`` fields (replacing those of ``config``, if given).
        """
        config = config or SpaceConfig()
        if options:
            config = dataclasses.replace(config, **options)
        groups = discover_groups(model, example_inputs, ignored=config.ignored)
        check_keeps_a_head(groups, config.ratio_min, "ratio_min")
        space = cls(groups=tuple(groups), config=config)
        return space.with_cost_model(CostModel.build(model, example_inputs, groups))

    def with_cost_model(self, cost_model: CostModel) -> "SearchSpace":
        return dataclasses.replace(self, cost_model=cost_model)

    def with_config(self, **changes: Any) -> "SearchSpace":
        """The same groups and cost model under a config with ``changes`` applied."""
        return dataclasses.replace(self, config=dataclasses.replace(self.config, **changes))

    # -- configuration ---------------------------------------------------------------------
    @property
    def ratio_min(self) -> float:
        return self.config.ratio_min

    @property
    def ratio_max(self) -> float:
        return self.config.ratio_max

    @property
    def ratio_step(self) -> float:
        return self.config.ratio_step

    @property
    def methods(self) -> tuple[str, ...]:
        return self.config.methods

    @property
    def method_per_group(self) -> bool:
        return self.config.method_per_group

    @property
    def recoveries(self) -> tuple[str, ...]:
        return self.config.recoveries

    @property
    def round_to(self) -> int:
        return self.config.round_to

    # -- grid ---------------------------------------------------------------------------
    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    @property
    def levels(self) -> tuple[float, ...]:
        """The ratio grid, ratio_min .. ratio_max inclusive."""
        n = int(round((self.ratio_max - self.ratio_min) / self.ratio_step))
        return tuple(round(self.ratio_min + i * self.ratio_step, 10) for i in range(n + 1))

    def snap(self, ratio: float) -> float:
        """Nearest grid level to ``ratio`` (clipped to the range)."""
        levels = np.array(self.levels)
        return float(levels[int(np.argmin(np.abs(levels - ratio)))])

    # -- policies -----------------------------------------------------------------------
    def validate(self, policy: Policy) -> None:
        """Raise ``ValueError`` naming what in ``policy`` is outside this space."""
        policy.validate(self.group_names, self.methods)
        if isinstance(policy.method, Mapping) and not self.method_per_group:
            raise ValueError("per-group methods need method_per_group = true in the space")
        if policy.recovery is not None and self.recoveries and policy.recovery not in self.recoveries:
            raise ValueError(f"unknown recovery {policy.recovery!r} (allowed: {', '.join(self.recoveries)})")

    def uniform(self, ratio: float, method: str | None = None) -> Policy:
        """Every group at the same remaining ``ratio`` (not snapped to the grid)."""
        return Policy(ratios={n: ratio for n in self.group_names}, method=method or self.methods[0])

    def uniform_sweep(self, n: int, max_flops_ratio: float | None = None) -> list[Policy]:
        """Up to ``n`` distinct uniform policies on the ratio grid whose FLOPs ratios are spread
        evenly from the smallest model to the largest within ``max_flops_ratio`` (largest first).

        The uniform baseline is strong on its own (every group pruned alike); searchers that
        start from it explore per-group deviations around a front that is already good.
        """
        check_int("n", n, 0)
        if n == 0:
            return []
        grid = sorted(self.levels)
        flops = [self.flops_ratio(self.uniform(r)) for r in grid]
        cap = 1.0 if max_flops_ratio is None else max_flops_ratio
        feasible = [(f, r) for f, r in zip(flops, grid) if f <= cap + 1e-12] or [(flops[0], grid[0])]
        lo, hi = feasible[0][0], feasible[-1][0]
        targets = [hi] if n == 1 else [hi - i * (hi - lo) / (n - 1) for i in range(n)]
        chosen: list[float] = []
        for t in targets:  # the grid ratio nearest in FLOPs, each used once
            r = min(feasible, key=lambda fr: abs(fr[0] - t))[1]
            if r not in chosen:
                chosen.append(r)
        return [self.uniform(r) for r in chosen]

    def uniform_ratio_within(self, max_flops_ratio: float) -> float:
        """The largest remaining ratio (not snapped to the grid, not limited to its range) whose
        uniform policy has an exact FLOPs ratio <= ``max_flops_ratio``: the uniform baseline
        at a FLOPs level."""
        lo, hi = 1e-3, 1.0
        if self.flops_ratio(self.uniform(hi)) <= max_flops_ratio:
            return hi
        for _ in range(40):  # FLOPs are monotone in the uniform ratio; kept counts make it a step function
            mid = (lo + hi) / 2
            if self.flops_ratio(self.uniform(mid)) <= max_flops_ratio:
                lo = mid
            else:
                hi = mid
        # A short ratio for reports, but never rounded up across a channel-count step.
        short = math.floor(lo * 1e6) / 1e6
        return short if self.flops_ratio(self.uniform(short)) <= max_flops_ratio else lo

    def sample(self, rng: np.random.Generator) -> Policy:
        """A uniformly random policy on the grid."""
        genome = [int(rng.integers(0, n)) for n in self.genome_sizes()]
        return self.decode(genome)

    def kept(self, policy: Policy) -> dict[str, int]:
        """Channels each group keeps under ``policy`` (with ``round_to``)."""
        return {g.name: kept_channels(g.channels, policy.ratio(g.name), self.round_to) for g in self.groups}

    def predict_cost(self, policy: Policy) -> Cost:
        """Analytic FLOPs/params of the pruned model, without building it."""
        if self.cost_model is None:
            raise ValueError("this search space was built without a cost model (use SearchSpace.from_model)")
        self.validate(policy)
        return self.cost_model.predict(self.kept(policy))

    @property
    def base_cost(self) -> Cost:
        if self.cost_model is None:
            raise ValueError("this search space was built without a cost model (use SearchSpace.from_model)")
        return self.cost_model.base

    def flops_ratio(self, policy: Policy) -> float:
        return self.predict_cost(policy).flops / self.base_cost.flops

    # -- genomes (GA) ---------------------------------------------------------------------
    def method_slots(self) -> list[str]:
        if len(self.methods) == 1:
            return []
        if self.method_per_group:
            return [f"{n}.{METHOD_PARAM}" for n in self.group_names]
        return [METHOD_PARAM]

    def genome_sizes(self) -> list[int]:
        """Number of choices per genome position: groups, then methods, then recovery."""
        sizes = [len(self.levels)] * len(self.groups)
        sizes += [len(self.methods)] * len(self.method_slots())
        if len(self.recoveries) > 1:
            sizes.append(len(self.recoveries))
        return sizes

    def encode(self, policy: Policy) -> list[int]:
        """Genome of ``policy``: grid index per group, then method/recovery indices."""
        self.validate(policy)
        levels = np.array(self.levels)
        genome = [int(np.argmin(np.abs(levels - policy.ratio(n)))) for n in self.group_names]
        slots = self.method_slots()
        if slots == [METHOD_PARAM]:
            genome.append(self.methods.index(policy.method_for(self.group_names[0], self.methods[0])))
        elif slots:
            genome += [self.methods.index(policy.method_for(n, self.methods[0])) for n in self.group_names]
        if len(self.recoveries) > 1:
            genome.append(self.recoveries.index(policy.recovery or self.recoveries[0]))
        return genome

    def decode(self, genome: Sequence[int]) -> Policy:
        """Policy of a genome (inverse of ``encode`` on grid policies)."""
        sizes = self.genome_sizes()
        if len(genome) != len(sizes):
            raise ValueError(f"genome has {len(genome)} genes, the space needs {len(sizes)}")
        for i, (gene, size) in enumerate(zip(genome, sizes)):
            if not 0 <= int(gene) < size:
                raise ValueError(f"gene {i} = {gene} outside [0, {size})")
        g = len(self.groups)
        ratios = {n: self.levels[int(genome[i])] for i, n in enumerate(self.group_names)}
        slots = self.method_slots()
        method: str | dict[str, str] = self.methods[0]
        if slots == [METHOD_PARAM]:
            method = self.methods[int(genome[g])]
        elif slots:
            method = {n: self.methods[int(genome[g + i])] for i, n in enumerate(self.group_names)}
        recovery = self.recoveries[int(genome[-1])] if len(self.recoveries) > 1 else None
        return Policy(ratios=ratios, method=method, recovery=recovery)

    # -- params (names shared by every searcher; Optuna distributions: search.params) --
    def to_params(self, policy: Policy) -> dict[str, Any]:
        """Optuna params of ``policy`` (ratios snapped to the grid)."""
        return self.params_of_genome(self.encode(policy))

    def params_of_genome(self, genome: Sequence[int]) -> dict[str, Any]:
        policy = self.decode(genome)
        params: dict[str, Any] = {n: policy.ratio(n) for n in self.group_names}
        for slot in self.method_slots():
            group = slot[: -len(METHOD_PARAM) - 1] if slot != METHOD_PARAM else self.group_names[0]
            params[slot] = policy.method_for(group, self.methods[0])
        if len(self.recoveries) > 1:
            params[RECOVERY_PARAM] = policy.recovery
        return params

    def from_params(self, params: Mapping[str, Any]) -> Policy:
        """Policy from Optuna params (missing groups keep 1.0)."""
        ratios = {n: float(params[n]) for n in self.group_names if n in params}
        slots = self.method_slots()
        method: str | dict[str, str] = self.methods[0]
        if slots == [METHOD_PARAM]:
            method = str(params.get(METHOD_PARAM, self.methods[0]))
        elif slots:
            method = {n: str(params.get(f"{n}.{METHOD_PARAM}", self.methods[0])) for n in self.group_names}
        recovery = params.get(RECOVERY_PARAM) if len(self.recoveries) > 1 else None
        policy = Policy(ratios=ratios, method=method, recovery=recovery)
        self.validate(policy)
        return policy

    def fingerprint(self) -> dict[str, Any]:
        """What must match for an existing study to be resumed with this space."""
        return {
            "groups": {g.name: g.channels for g in self.groups},
            "ratio": [self.ratio_min, self.ratio_max, self.ratio_step],
            "methods": list(self.methods),
            "method_per_group": self.method_per_group,
            "recoveries": list(self.recoveries),
            "round_to": self.round_to,
        }

    @property
    def min_flops_ratio(self) -> float:
        """FLOPs ratio of the smallest policy the space can express."""
        return self.flops_ratio(self.uniform(self.ratio_min))

    def describe(self) -> str:
        lines = [f"{len(self.groups)} channel groups, ratios {self.ratio_min}..{self.ratio_max} step {self.ratio_step}"]
        width = max(len(g.name) for g in self.groups)
        for g in self.groups:
            unit = f" x {g.unit}" if g.unit > 1 else ""   # heads / normalisation groups of g.unit channels
            lines.append(f"  {g.name:<{width}}  {g.channels:>5}{unit} ch  ({len(g.members)} layers)")
        return "\n".join(lines)
