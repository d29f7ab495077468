"""Metrics: what one evaluation of a policy measured."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


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
