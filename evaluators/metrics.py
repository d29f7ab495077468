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

    @property
    def ok(self) -> bool:
        return self.error is None and self.accuracy is not None and math.isfinite(self.accuracy)

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


register_objective("accuracy", Objective(MAXIMIZE, "accuracy"))
register_objective("flops", Objective(MINIMIZE, "flops_ratio"))
register_objective("params", Objective(MINIMIZE, "params_ratio"))
register_objective("latency_ms", Objective(MINIMIZE, "latency_ms"))
register_objective("latency_ratio", Objective(MINIMIZE, "latency_ratio"))  # to the unpruned model's latency
