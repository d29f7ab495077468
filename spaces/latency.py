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
import ctypes
import ctypes.util
import functools
import hashlib
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from spaces.groups import forward
from spaces.policy import Policy

log = logging.getLogger(__name__)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Stop glibc from handing activation buffers back to the kernel after every forward pass.

    By default glibc serves allocations over 128 KiB-32 MiB with ``mmap`` and trims the heap
    on ``free``, so each forward pass of a CNN maps, page-faults and unmaps its activations
    again: kernel time inside every forward pass, and repeated timings of the *same* model
    that wander with the state of the page cache. Raising the mmap and trim
    thresholds keeps freed pages in the process (what jemalloc/tcmalloc do by default).
    Idempotent; returns whether the allocator was tuned (False off glibc).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1  # glibc's maximum
    ok = mallopt(_M_TRIM_THRESHOLD, 1024 * 1024 * 1024) == 1 and ok
    return ok


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
    keep_freed_memory()
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


def measure_paired_ms(model: nn.Module, reference: nn.Module, inputs: Any, *, rounds: int = 15, warmup: int = 3,
                      threads: int = 1) -> tuple[float, float]:
    """Latency (ms) of ``model`` and of ``reference``, timed alternately; use their ratio.

    Each round times both models back to back (A B, then B A), so both see the same state
    of the machine (frequency, other processes, a noisy neighbour on a shared VM). The
    ratio is the median over rounds of the two timings' ratio; ``reference`` is its fastest
    round and ``model`` that times the ratio. On a 2-core VM the machine's speed shifts
    between regimes for tens of milliseconds at a time, so the fastest round of each model
    often comes from different regimes: the ratio of the two minima of the same pair
    varied with SD 0.03-0.06 over repeats, the median of per-round ratios with SD 0.01.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"latency rounds must be an integer >= 1, got {rounds!r}")
    keep_freed_memory()
    models = (model.eval(), reference.eval())
    ratios, reference_ms = [], math.inf
    with torch_threads(threads), torch.inference_mode():
        for m in models:
            for _ in range(warmup):
                forward(m, inputs)
        for r in range(rounds):
            pair = [0.0, 0.0]
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                start = time.perf_counter()
                forward(models[i], inputs)
                pair[i] = (time.perf_counter() - start) * 1000.0
            ratios.append(pair[0] / pair[1])
            reference_ms = min(reference_ms, pair[1])
    return statistics.median(ratios) * reference_ms, reference_ms


_PREDICTORS = ("fitted", "additive")


@dataclass(frozen=True)
class LatencySettings:
    """How a latency table is measured.

    ``runs`` interleaved rounds per measured model; ``levels`` the per-group ratios of the
    NetAdapt table; ``calibration`` extra random whole-model policies measured to fit the
    ``fitted`` predictor (see ``LatencyTable``).
    """

    batch: int = 1
    threads: int = 1
    runs: int = 15
    warmup: int = 3
    levels: tuple[float, ...] = (0.25, 0.5, 0.75)
    calibration: int = 16
    predictor: str = "fitted"

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
        if isinstance(self.calibration, bool) or not isinstance(self.calibration, int) or self.calibration < 0:
            raise ValueError(f"latency calibration must be an integer >= 0, got {self.calibration!r}")
        if self.predictor not in _PREDICTORS:
            raise ValueError(f"latency predictor must be one of {', '.join(_PREDICTORS)}, got {self.predictor!r}")


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


def spanning_policies(space: Any, n: int, seed: int = 0) -> list[Policy]:
    """Random policies covering small to large models: a global level plus per-group jitter."""
    rng = np.random.default_rng(seed)
    policies = []
    lo, hi = space.ratio_min, space.ratio_max
    for _ in range(n):
        level = rng.uniform(lo, hi)
        ratios = {g: float(np.clip(level + rng.normal(0, 0.15), lo, hi)) for g in space.group_names}
        policies.append(Policy(ratios={g: space.snap(r) for g, r in ratios.items()}))
    return policies


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
    timing = dict(rounds=settings.runs, warmup=settings.warmup, threads=settings.threads)
    base = model.eval()
    # Every model is timed alternately with the base; its latency is its ratio to the base in
    # that pairing times the base's overall latency, so slow drifts cancel.
    measured: list[tuple[Policy, float]] = []  # (policy, ratio to base)
    base_times: list[float] = []

    def time_policy(policy: Policy) -> float:
        pruned = apply_policy(base, policy, example_inputs, groups=space.groups, round_to=space.round_to)
        ms, ref = measure_paired_ms(pruned, base, batch, **timing)
        base_times.append(ref)
        return ms / ref

    levels_ratio: dict[str, list[float]] = {}
    variants = [(g, level) for g in space.groups for level in settings.levels]
    calibration = spanning_policies(space, settings.calibration, seed=0)
    for g, level in _progress(variants, "latency table"):
        policy = Policy(ratios={g.name: level})
        ratio = time_policy(policy)
        levels_ratio.setdefault(g.name, []).append(ratio)
        measured.append((policy, ratio))
    for policy in _progress(calibration, "latency calibration"):
        measured.append((policy, time_policy(policy)))
    base_ms = statistics.median(base_times) if base_times else measure_latency_ms(base, batch, runs=settings.runs,
                                                                                   statistic="min")
    deltas = {name: tuple((r - 1.0) * base_ms for r in rs) for name, rs in levels_ratio.items()}
    coefficients: dict[str, float] = {}
    if space.cost_model is not None and space.cost_model.term_kinds:
        features = [space.cost_model.flops_by_kind({})] + [
            space.cost_model.flops_by_kind(space.kept(p)) for p, _ in measured]
        coefficients = fit_latency_model(features, [base_ms] + [r * base_ms for _, r in measured])
    table = LatencyTable(
        base_ms=base_ms, levels=settings.levels, deltas=deltas, key=key,
        build_seconds=time.perf_counter() - start, meta={"batch": settings.batch, "threads": settings.threads},
        coefficients=coefficients, predictor=settings.predictor if coefficients else "additive",
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(table.to_json())
        tmp.replace(path)  # atomic: a crash never leaves a half-written table
    return table


def predict_latency_ms(table: LatencyTable, space: Any, policy: Any) -> float:
    """Predicted latency (ms) of ``policy`` by the table's predictor, after channel rounding."""
    if table.predictor == "fitted" and space.cost_model is not None:
        return max(table.predict_fitted(space.cost_model.flops_by_kind(space.kept(policy))), 0.05 * table.base_ms)
    return additive_latency_ms(table, space, policy)


def additive_latency_ms(table: LatencyTable, space: Any, policy: Any) -> float:
    """The table's NetAdapt (sum of per-group deltas) latency of ``policy``, after channel rounding."""
    kept = space.kept(policy)
    return table.predict({g.name: kept[g.name] / g.channels for g in space.groups})


def _progress(items: list, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="model", leave=False, disable=not log.isEnabledFor(logging.INFO))
