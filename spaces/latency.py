"""Measured latency lookup table (NetAdapt-style) and CPU latency measurement.

FLOPs do not predict speed well (memory-bound layers, kernel choices, non-monotonic
behaviour at odd channel counts), so latency is measured. For every group and a few ratio
levels, the model is pruned in that group alone and timed; a policy's predicted latency is
the unpruned latency plus the sum of the per-group deltas, interpolated between levels.
A table is specific to (architecture, groups, batch size, threads, device) and cached on
disk under that key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import statistics
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from spaces.groups import forward
from spaces.policy import Policy

log = logging.getLogger(__name__)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run a block with ``threads`` intra-op threads, then restore the previous setting."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    previous = torch.get_num_threads()
    if previous != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def measure_latency_ms(model: nn.Module, inputs: Any, *, runs: int = 20, warmup: int = 3, threads: int = 1,
                       statistic: str = "median") -> float:
    """Median (or ``statistic="min"``) wall time (ms) of ``runs`` forward passes after ``warmup`` untimed ones."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"latency runs must be an integer >= 1, got {runs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"latency warmup must be an integer >= 0, got {warmup!r}")
    was_training = model.training
    model.eval()
    times = []
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            forward(model, inputs)
        for _ in range(runs):
            start = time.perf_counter()
            forward(model, inputs)
            times.append((time.perf_counter() - start) * 1000.0)
    model.train(was_training)
    return min(times) if statistic == "min" else statistics.median(times)


@dataclass(frozen=True)
class LatencySettings:
    """How a latency table is measured."""

    batch: int = 1
    threads: int = 1
    runs: int = 15
    warmup: int = 3
    levels: tuple[float, ...] = (0.25, 0.5, 0.75)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(sorted(float(x) for x in self.levels)))
        if self.batch < 1:
            raise ValueError(f"latency batch must be >= 1, got {self.batch}")
        if self.threads < 1:
            raise ValueError(f"latency threads must be >= 1, got {self.threads}")
        if self.runs < 1 or self.warmup < 0:
            raise ValueError(f"latency runs must be >= 1 and warmup >= 0, got {self.runs}, {self.warmup}")
        if not self.levels or not all(0.0 < x < 1.0 for x in self.levels):
            raise ValueError(f"latency levels must lie in (0, 1), got {self.levels}")


@dataclass(frozen=True)
class LatencyTable:
    """Per-group latency deltas (ms) at ratio levels; delta at ratio 1.0 is 0 by definition."""

    base_ms: float
    levels: tuple[float, ...]
    deltas: Mapping[str, tuple[float, ...]]
    key: str = ""
    build_seconds: float = 0.0
    meta: Mapping[str, Any] = field(default_factory=dict)

    def group_delta(self, group: str, ratio: float) -> float:
        xs = list(self.levels) + [1.0]
        ys = list(self.deltas[group]) + [0.0]
        if ratio <= xs[0]:  # extrapolate linearly below the lowest measured level
            slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
            return ys[0] + slope * (ratio - xs[0])
        return float(np.interp(ratio, xs, ys))

    def predict(self, ratios: Mapping[str, float]) -> float:
        """Predicted latency (ms) when each group keeps the given fraction of its channels.

        Deltas are additive (NetAdapt); where groups share layers (one group's outputs are the
        next one's inputs) additivity over-counts savings, so the sum is floored at 5% of base.
        """
        total = self.base_ms + sum(self.group_delta(g, r) for g, r in ratios.items() if g in self.deltas)
        return max(total, 0.05 * self.base_ms)

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


def table_key(model: nn.Module, space: Any, settings: LatencySettings, device: str = "cpu") -> str:
    """Cache key: architecture, groups, rounding, batch, threads, levels, runtime and machine."""
    payload = {
        "arch": repr(model),
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
        "groups": [[g.name, g.channels] for g in space.groups],
        "round_to": space.round_to,
        "settings": asdict(settings),
        "torch": torch.__version__,
        "machine": [platform.machine(), platform.processor(), device],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def build_latency_table(
    model: nn.Module,
    example_inputs: torch.Tensor,
    space: "SearchSpace",
    settings: LatencySettings = LatencySettings(),
    cache_dir: str | Path | None = None,
) -> LatencyTable:
    """Measure (or load from ``cache_dir``) the latency table of ``model`` over ``space``.

    ``example_inputs`` is one sample; it is repeated to ``settings.batch``.
    """
    from evaluators.prune import apply_policy  # spaces stays free of evaluators at import time

    key = table_key(model, space, settings)
    path = Path(cache_dir) / f"latency-{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            table = LatencyTable.from_json(path.read_text())
            if table.key == key:
                return table
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable latency table %s", path)
    start = time.perf_counter()
    batch = example_inputs.repeat(settings.batch, *([1] * (example_inputs.dim() - 1)))
    # The table uses the fastest run, not the median: on a shared machine other processes only
    # ever add time, so the minimum is the steadiest estimate of a model's own cost.
    timing = dict(runs=settings.runs, warmup=settings.warmup, threads=settings.threads, statistic="min")
    base = model.eval()
    base_ms = measure_latency_ms(base, batch, **timing)
    deltas: dict[str, tuple[float, ...]] = {}
    for g in space.groups:
        row = []
        for level in settings.levels:
            pruned = apply_policy(base, Policy(ratios={g.name: level}), example_inputs,
                                  groups=space.groups, round_to=space.round_to)
            row.append(measure_latency_ms(pruned, batch, **timing) - base_ms)
        deltas[g.name] = tuple(row)
    # re-time the base at the end and average: drifts (turbo, other load) shift every delta alike
    base_ms = (base_ms + measure_latency_ms(base, batch, **timing)) / 2
    table = LatencyTable(
        base_ms=base_ms, levels=settings.levels, deltas=deltas, key=key,
        build_seconds=time.perf_counter() - start, meta={"batch": settings.batch, "threads": settings.threads},
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(table.to_json())
        tmp.replace(path)  # atomic: a crash never leaves a half-written table
    return table


def predict_latency_ms(table: LatencyTable, space: Any, policy: Any) -> float:
    """LUT latency of ``policy``, using the kept fraction after channel rounding."""
    kept = space.kept(policy)
    return table.predict({g.name: kept[g.name] / g.channels for g in space.groups})
