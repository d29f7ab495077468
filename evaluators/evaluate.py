"""evaluate: one policy -> Metrics, in this process (``build_pruned`` -> measure).

Everything runs on ``settings.device`` (``evaluators.devices``): the base model is moved
there once (a copy when the caller's lives elsewhere), the pruned model is built, measured
and timed there. FLOPs/params are counted by ``spaces.cost.count_cost`` on the model where
it is (the counter works on any device; the counts do not depend on it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from evaluators import timing
from evaluators.build import build_pruned
from evaluators.devices import model_device, on_device, placed, resolve_device, to_device
from evaluators.measure import model_cost, task_values
from evaluators.metrics import Metrics
from evaluators.settings import EvalSettings
from evaluators.tasks import Task
from spaces.cost import Cost
from spaces.groups import ChannelGroup, discover_groups
from spaces.policy import Policy

log = logging.getLogger(__name__)

_DEFAULT_SETTINGS = EvalSettings()


def validation_batches(task: Task, settings: EvalSettings) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches in stored order, so every policy is scored on the same samples
    (a Dataset split's decoded as they are read: ``Task.stream``)."""
    return task.stream("validation", settings.batch_size, limit=settings.eval_samples, seed=None)


def _measure(
    model: nn.Module, task: Task, settings: EvalSettings, base: nn.Module, base_cost: Cost,
    timings: dict[str, float],
) -> dict[str, float | None]:
    start = time.perf_counter()
    device = model_device(model)
    values = task_values(model, task, validation_batches(task, settings))  # batches moved to the model's device
    timings["accuracy"] = time.perf_counter() - start

    start = time.perf_counter()
    cost = model_cost(model, task.example_inputs)
    timings["cost"] = time.perf_counter() - start

    latency = ratio = None
    if settings.measure_latency:
        start = time.perf_counter()
        inputs = to_device(timing.latency_inputs(task.example_inputs, settings.latency.batch), device)
        # timed alternately with the unpruned model: the ratio is free of the machine's drifts
        latency, base_ms = timing.measure_paired_ms(model, base, inputs, rounds=settings.latency.runs,
                                                    warmup=settings.latency.warmup, threads=settings.threads)
        ratio = latency / base_ms
        timings["latency"] = time.perf_counter() - start
    return {
        "accuracy": values.get("accuracy"),
        "values": values,
        "flops": cost.flops,
        "params": cost.params,
        "flops_ratio": cost.flops / base_cost.flops if base_cost.flops else None,
        "params_ratio": cost.params / base_cost.params if base_cost.params else None,
        "latency_ms": latency,
        "latency_ratio": ratio,
    }


def _averaged(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The first run's measurements with every task value the mean over ``runs`` (a value
    missing from a run is left out of its mean)."""
    first = runs[0]
    if len(runs) == 1:
        return first
    values = {}
    for name in first["values"]:
        got = [r["values"].get(name) for r in runs if r["values"].get(name) is not None]
        values[name] = sum(got) / len(got) if got else None
    return {**first, "values": values, "accuracy": values.get("accuracy")}


def evaluate(
    policy: Policy,
    task: Task,
    settings: EvalSettings = _DEFAULT_SETTINGS,
    *,
    groups: Sequence[ChannelGroup] | None = None,
    round_to: int = 1,
    base_model: nn.Module | None = None,
    base_cost: Cost | None = None,
) -> Metrics:
    """Prune ``task``'s base model by ``policy``, recover it and measure it.

    Never raises for a bad or failing policy: returns ``Metrics.failure``. ``groups``,
    ``base_model`` (unpruned, never modified) and ``base_cost`` are computed when not
    given; pass them when evaluating many policies (``base_model`` already on
    ``settings.device`` saves a copy per call). Deterministic given ``settings.seed`` on
    the CPU (torch threads are fixed to ``settings.threads`` for the call; see
    ``build_pruned``); CUDA kernels need not be bit-for-bit deterministic.
    """
    start = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        device = resolve_device(settings.device)
        # fork_rng: building the base model must not change the caller's random stream.
        with timing.torch_threads(settings.threads), torch.random.fork_rng(devices=[]):
            base = placed(base_model, device) if base_model is not None else task.base_model().to(device)
            if groups is None:
                groups = discover_groups(base, to_device(task.example_inputs, device))
            if base_cost is None:
                base_cost = model_cost(base, task.example_inputs)
            runs = []
            for j in range(settings.repeats):
                # a repeat rebuilds the same architecture: its latency is the first's, timed once
                run = settings if j == 0 else settings.replace(seed=settings.seed + j, measure_latency=False)
                spent: dict[str, float] = {}
                pruned = build_pruned(policy, task, run, groups=groups, round_to=round_to, base=base, timings=spent)
                runs.append(_measure(pruned, task, run, base, base_cost, spent))
                for phase, seconds in spent.items():   # each phase's time summed over the repeats
                    timings[phase] = timings.get(phase, 0.0) + seconds
            values = _averaged(runs)
        return Metrics(
            **values, eval_seconds=time.perf_counter() - start, fidelity=settings.fidelity, timings=timings
        )
    except Exception as exc:  # a failing policy is a result, not a crash
        log.debug("evaluation of %s failed", policy.to_json(), exc_info=True)
        return Metrics.failure(exc, eval_seconds=time.perf_counter() - start, fidelity=settings.fidelity)


def evaluate_model(model: nn.Module, task: Task, settings: EvalSettings = _DEFAULT_SETTINGS) -> Metrics:
    """Measure an already pruned (and recovered) ``model`` as ``evaluate`` would.

    Raises on failure (the caller holds a concrete model, e.g. during export). ``model`` is
    measured on ``settings.device`` and handed back on the device it was given on.
    """
    start = time.perf_counter()
    timings: dict[str, float] = {}
    device = resolve_device(settings.device)
    with timing.torch_threads(settings.threads), on_device(model, device):  # ``model`` comes back where it was
        base = task.base_model().to(device)
        base_cost = model_cost(base, task.example_inputs)
        values = _measure(model, task, settings, base, base_cost, timings)
    return Metrics(**values, eval_seconds=time.perf_counter() - start, fidelity=settings.fidelity, timings=timings)
