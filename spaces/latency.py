"""Latency lookup table (NetAdapt-style) and how it predicts a policy's latency.

FLOPs do not predict speed well, so latency is measured (``evaluators.latency_table``
builds the table) and predicted here from the measurements: either additively (per-group
deltas) or by a model fitted on FLOPs per layer kind. Pure data and arithmetic: no model
is built or timed here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LatencyTable:
    """Measured latencies of one model over a search space, and two ways to predict a policy.

    * ``additive`` (NetAdapt): base + the sum of per-group deltas, each measured with only
      that group pruned (``deltas``, at ``levels``; 0 at ratio 1). It ignores that a conv's
      cost is the *product* of its input and output widths, so it over-counts the savings of
      pruning neighbouring groups together.
    * ``fitted`` (default): latency = intercept + sum over layer kinds (dense conv, 1x1 conv,
      depthwise, linear, elementwise) of a measured ms-per-FLOP times that kind's FLOPs under
      the policy, from the exact cost model, so interactions between groups are exact. The
      non-negative coefficients are least-squares fitted to every model timed for the table
      (base, each group alone at each level, and ``calibration`` random whole-model policies).
    """

    base_ms: float
    levels: tuple[float, ...]
    deltas: Mapping[str, tuple[float, ...]]
    key: str = ""
    build_seconds: float = 0.0
    meta: Mapping[str, Any] = field(default_factory=dict)
    coefficients: Mapping[str, float] = field(default_factory=dict)  # "intercept" + ms per FLOP by kind
    predictor: str = "additive"

    def group_delta(self, group: str, ratio: float) -> float:
        xs = list(self.levels) + [1.0]
        ys = list(self.deltas[group]) + [0.0]
        if ratio <= xs[0]:  # extrapolate linearly below the lowest measured level
            slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
            return ys[0] + slope * (ratio - xs[0])
        return float(np.interp(ratio, xs, ys))

    def predict(self, ratios: Mapping[str, float]) -> float:
        """Additive (NetAdapt) latency (ms) when each group keeps the given fraction of its channels.

        Where groups share layers additivity over-counts savings, so the sum is floored at 5% of base.
        """
        total = self.base_ms + sum(self.group_delta(g, r) for g, r in ratios.items() if g in self.deltas)
        return max(total, 0.05 * self.base_ms)

    def predict_fitted(self, flops_by_kind: Mapping[str, float]) -> float:
        """Fitted latency (ms) from a policy's FLOPs per layer kind (``CostModel.flops_by_kind``)."""
        coef = self.coefficients
        return coef.get("intercept", 0.0) + sum(coef.get(k, 0.0) * v for k, v in flops_by_kind.items())

    def to_json(self) -> str:
        data = asdict(self)
        data["deltas"] = {k: list(v) for k, v in self.deltas.items()}
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LatencyTable":
        data = json.loads(text)
        data["levels"] = tuple(data["levels"])
        data["deltas"] = {k: tuple(v) for k, v in data["deltas"].items()}
        return cls(**data)


def fit_latency_model(features: Sequence[Mapping[str, float]], measured_ms: Sequence[float]) -> dict[str, float]:
    """Non-negative least squares: ms = intercept + sum_k coef_k * flops_k (per layer kind)."""
    from scipy.optimize import nnls

    kinds = sorted({k for f in features for k, v in f.items() if v > 0})
    scale = {k: max(max(f.get(k, 0.0) for f in features), 1e-12) for k in kinds}  # condition the columns
    x = np.array([[1.0] + [f.get(k, 0.0) / scale[k] for k in kinds] for f in features])
    y = np.asarray(measured_ms, dtype=np.float64)
    solution, _ = nnls(x, y)
    coef = {"intercept": float(solution[0])}
    coef.update({k: float(w / scale[k]) for k, w in zip(kinds, solution[1:])})
    return coef


def predict_latency_ms(table: LatencyTable, space: Any, policy: Any) -> float:
    """Predicted latency (ms) of ``policy`` by the table's predictor, after channel rounding."""
    if table.predictor == "fitted" and space.cost_model is not None:
        return max(table.predict_fitted(space.cost_model.flops_by_kind(space.kept(policy))), 0.05 * table.base_ms)
    return additive_latency_ms(table, space, policy)


def additive_latency_ms(table: LatencyTable, space: Any, policy: Any) -> float:
    """The table's NetAdapt (sum of per-group deltas) latency of ``policy``, after channel rounding."""
    kept = space.kept(policy)
    return table.predict({g.name: kept[g.name] / g.channels for g in space.groups})
