"""Metrics (what one evaluation of a policy measured) and the registry of objectives a
study can optimise (name -> direction + how its value is read from a ``Metrics``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from collections.abc import Callable
from typing import Any

from spaces.checks import check_choice
from spaces.registry import Registry


@dataclass(frozen=True)
class Metrics:
    """Result of evaluating one policy. A failed evaluation has ``error`` set (one line).

    ``flops`` are multiply-accumulates per sample of the real pruned model, ``params`` its
    parameter count; ``flops_ratio``/``params_ratio`` are relative to the unpruned model.
    ``timings`` splits ``eval_seconds`` into phases (prune, recover, forward, ...).
    ``values`` holds the task's own metrics (``Task.metrics``: name -> value, e.g.
    ``{"perplexity": 3.2}``); a classification task's is ``{"accuracy": ...}``, and a task
    metric named ``accuracy`` is also ``accuracy`` (which stays None for a task without one).
    """

    accuracy: float | None = None
    flops: float | None = None
    params: float | None = None
    flops_ratio: float | None = None
    params_ratio: float | None = None
    latency_ms: float | None = None
    latency_ratio: float | None = None
    eval_seconds: float = 0.0
    error: str | None = None
    fidelity: str = "full"
    timings: dict[str, float] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No error, and the quality measured: every task value finite (older records,
        without ``values``: a finite accuracy)."""
        if self.error is not None:
            return False
        if self.values:
            return all(isinstance(v, (int, float)) and math.isfinite(v) for v in self.values.values())
        return self.accuracy is not None and math.isfinite(self.accuracy)

    @classmethod
    def failure(cls, error: BaseException | str, eval_seconds: float = 0.0, fidelity: str = "full") -> "Metrics":
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        line = " ".join(str(error).split())[:500] or "unknown error"
        return cls(error=line, eval_seconds=eval_seconds, fidelity=fidelity)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Metrics":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# -- objectives --------------------------------------------------------------------------
MAXIMIZE = "maximize"
MINIMIZE = "minimize"


@dataclass(frozen=True)
class Objective:
    """What a study can optimise: a direction and how its value is read from ``Metrics``.

    ``metric`` names the ``Metrics`` field holding the value; ``read`` (optional) computes
    the value instead, for an objective derived from several fields. A value of ``None``
    means "not measured".
    """

    direction: str
    metric: str = ""
    read: Callable[[Metrics], float | None] | None = None

    def __post_init__(self) -> None:
        check_choice("objective direction", self.direction, (MAXIMIZE, MINIMIZE))
        if self.read is None and self.metric not in {f.name for f in fields(Metrics)}:
            raise ValueError(f"objective metric must be a Metrics field or give read=, got {self.metric!r}")

    def value(self, metrics: Metrics) -> float | None:
        return self.read(metrics) if self.read is not None else getattr(metrics, self.metric)


OBJECTIVES: Registry[Objective] = Registry("objective")


def register_objective(name: str, objective: Objective) -> Objective:
    """Add ``objective`` under ``name`` (a study's ``[study] objectives`` entry). Registering
    an equal objective again is a no-op; a different one under a taken name is an error."""
    if name in OBJECTIVES and OBJECTIVES.get(name) == objective:
        return objective
    OBJECTIVES.register(name, objective)
    return objective


def get_objective(name: str) -> Objective:
    """The objective registered as ``name``; ``ValueError`` naming the known ones."""
    return OBJECTIVES.get(name)


@dataclass(frozen=True)
class TaskValue:
    """Reads a task's own metric ``name`` from ``Metrics.values`` (None when not measured);
    a dataclass, so two registrations of one task metric compare equal."""

    name: str

    def __call__(self, metrics: Metrics) -> float | None:
        value = metrics.values.get(self.name)
        return float(value) if isinstance(value, (int, float)) else None


def task_objective(name: str, direction: str) -> Objective:
    """The objective of a task's own metric ``name``, registered on first use. A task metric
    may reuse the name ``accuracy`` (the built-in quality, read from ``Metrics.accuracy``) or a
    name another task registered, with the same direction; ``ValueError`` otherwise (a
    metric named like a cost, e.g. ``flops``, would be read from the wrong place)."""
    if name in OBJECTIVES:
        known = OBJECTIVES.get(name)
        if name != "accuracy" and not isinstance(known.read, TaskValue):
            raise ValueError(f"task metric {name!r} has the name of a built-in cost objective: rename it")
        if known.direction != direction:
            raise ValueError(f"task metric {name!r} is to {direction}, but objective {name!r} is to {known.direction}")
        return known
    return register_objective(name, Objective(direction, read=TaskValue(name)))


register_objective("accuracy", Objective(MAXIMIZE, "accuracy"))
register_objective("flops", Objective(MINIMIZE, "flops_ratio"))
register_objective("params", Objective(MINIMIZE, "params_ratio"))
register_objective("latency_ms", Objective(MINIMIZE, "latency_ms"))
register_objective("latency_ratio", Objective(MINIMIZE, "latency_ratio"))  # to the unpruned model's latency
