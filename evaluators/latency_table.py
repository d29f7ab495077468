"""Latency configuration and the measured latency table of a model over a search space.

For every group and a few ratio levels the model is pruned in that group alone and timed,
plus ``calibration`` random whole-model policies; every model is timed alternately with the
unpruned one (``evaluators.timing.measure_paired_ms``) so slow drifts of the machine cancel.
The table (``spaces.latency.LatencyTable``) is specific to (architecture, groups, batch,
threads, machine, device) and cached on disk under that key. It is measured on the device
it is given (``[evaluation] device``, resolved where the table is built: the driver), a GPU
named by its model in the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from evaluators import timing
from evaluators.devices import placed, resolve_device, to_device
from evaluators.prune import apply_policy
from spaces.checks import check_bool, check_int, check_number_list, from_mapping
from spaces.latency import LatencyTable, fit_latency_model
from spaces.policy import Policy

log = logging.getLogger(__name__)

PREDICTORS = ("fitted", "additive")
# Keys that lived in [evaluation] before [latency] held every latency field.
MOVED_KEYS = {"latency_batch": "batch", "latency_runs": "runs"}


@dataclass(frozen=True)
class LatencyConfig:
    """How latency is measured: the ``[latency]`` table of a study.

    ``table``: whether the search predicts latency from a measured lookup table (built once
    per model and machine, cached) rather than timing every evaluation. ``batch``,
    ``threads``, ``runs`` (interleaved rounds per timed model) and ``warmup`` apply to every
    timing, the table's and the per-evaluation one (``[evaluation] measure_latency``);
    ``levels`` are the per-group ratios of the NetAdapt table and ``calibration`` the random
    whole-model policies timed to fit the ``fitted`` predictor (see ``LatencyTable``).
    """

    table: bool = True
    batch: int = 1
    threads: int = 1
    runs: int = 15
    warmup: int = 3
    levels: tuple[float, ...] = (0.25, 0.5, 0.75)
    calibration: int = 16
    predictor: str = "fitted"

    def __post_init__(self) -> None:
        check_bool("latency table", self.table)
        check_int("latency batch", self.batch, 1)
        check_int("latency threads", self.threads, 1)
        check_int("latency runs", self.runs, 1)
        check_int("latency warmup", self.warmup, 0)
        levels = tuple(sorted(check_number_list("latency levels", self.levels)))
        if not levels or not all(0.0 < x < 1.0 for x in levels):
            raise ValueError(f"latency levels must lie in (0, 1), got {levels}")
        object.__setattr__(self, "levels", levels)
        check_int("latency calibration", self.calibration, 0)
        if self.predictor not in PREDICTORS:
            raise ValueError(f"latency predictor must be one of {', '.join(PREDICTORS)}, got {self.predictor!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatencyConfig":
        """From a ``[latency]`` table; unknown keys are errors."""
        return from_mapping(cls, data, "[latency]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def table_key(model: nn.Module, space: Any, config: LatencyConfig, device: str = "cpu") -> str:
    """Cache key: architecture, groups, rounding, batch, threads, levels, runtime and machine."""
    measured = {k: v for k, v in config.to_dict().items() if k != "table"}  # how, not whether
    payload = {
        "arch": repr(model),
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
        "groups": [[g.name, g.channels] for g in space.groups],
        "round_to": space.round_to,
        "settings": measured,
        "torch": torch.__version__,
        "machine": [platform.machine(), platform.processor(), device],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def device_key(device: torch.device) -> str:
    """How a device enters the cache key: ``"cpu"``, or ``"cuda:<GPU model>"``."""
    return "cpu" if device.type == "cpu" else f"{device.type}:{torch.cuda.get_device_name(device)}"


def build_latency_table(model: nn.Module, example_inputs: torch.Tensor, space: Any,
                        config: LatencyConfig = LatencyConfig(), cache_dir: str | Path | None = None,
                        device: str = "cpu") -> LatencyTable:
    """Measure (or load from ``cache_dir``) the latency table of ``model`` over ``space``.

    ``example_inputs`` is one sample; it is repeated to ``config.batch``. ``device`` is an
    ``[evaluation] device`` name (``ValueError`` when it names CUDA this process lacks);
    ``model`` is not moved (a copy is, when it lives elsewhere).
    """
    target = resolve_device(device)
    key = table_key(model, space, config, device_key(target))
    path = Path(cache_dir) / f"latency-{key}.json" if cache_dir is not None else None
    cached = _load_cached(path, key)
    if cached is not None:
        return cached
    start = time.perf_counter()
    base = placed(model, target).eval()
    example_inputs = to_device(example_inputs, target)
    batch = timing.latency_inputs(example_inputs, config.batch)
    base_times: list[float] = []

    def ratio_to_base(policy: Policy) -> float:
        # Timed alternately with the base: the ratio is free of slow drifts of the machine.
        pruned = apply_policy(base, policy, example_inputs, groups=space.groups, round_to=space.round_to)
        ms, ref = timing.measure_paired_ms(pruned, base, batch, rounds=config.runs, warmup=config.warmup,
                                           threads=config.threads)
        base_times.append(ref)
        return ms / ref

    variants = [Policy(ratios={g.name: level}) for g in space.groups for level in config.levels]
    calibration = spanning_policies(space, config.calibration, seed=0)
    measured = [(p, ratio_to_base(p)) for p in _progress(variants, "latency table")]
    measured += [(p, ratio_to_base(p)) for p in _progress(calibration, "latency calibration")]
    base_ms = statistics.median(base_times)
    deltas: dict[str, list[float]] = {}
    for policy, ratio in measured[:len(variants)]:
        (name,) = policy.ratios
        deltas.setdefault(name, []).append((ratio - 1.0) * base_ms)
    coefficients = _fit(space, measured, base_ms)
    table = LatencyTable(
        base_ms=base_ms, levels=config.levels, deltas={k: tuple(v) for k, v in deltas.items()}, key=key,
        build_seconds=time.perf_counter() - start, meta={"batch": config.batch, "threads": config.threads},
        coefficients=coefficients, predictor=config.predictor if coefficients else "additive",
    )
    if path is not None:
        _store(path, table)
    return table


def _fit(space: Any, measured: list[tuple[Policy, float]], base_ms: float) -> dict[str, float]:
    """The ``fitted`` predictor's coefficients from every timed model (none without a cost model)."""
    cost_model = space.cost_model
    if cost_model is None or not cost_model.term_kinds:
        return {}
    features = [cost_model.flops_by_kind({})] + [cost_model.flops_by_kind(space.kept(p)) for p, _ in measured]
    return fit_latency_model(features, [base_ms] + [r * base_ms for _, r in measured])


def _load_cached(path: Path | None, key: str) -> LatencyTable | None:
    if path is None or not path.is_file():
        return None
    try:
        table = LatencyTable.from_json(path.read_text())
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable latency table %s", path)
        return None
    return table if table.key == key else None


def _store(path: Path, table: LatencyTable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(table.to_json())
    tmp.replace(path)  # atomic: a crash never leaves a half-written table


def _progress(items: list, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="model", leave=False, disable=not log.isEnabledFor(logging.INFO))
