"""EvalSettings: how one policy is evaluated (recovery, data budget, latency, threads, seed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class EvalSettings:
    """Everything an evaluation of a policy depends on besides the policy and the task.

    Calibration data: ``calibration_samples`` samples of the task's calibration split,
    cut into ``bn_batches`` batches; adaptive BN uses all of them, importance criteria
    and compensation receive the same batches.
    """

    recovery: str = "adaptive_bn"      # a name in the recovery registry
    calibration_samples: int = 256     # samples used for adaptive BN / importance / compensation
    bn_batches: int = 4
    finetune_steps: int = 0            # used by "finetune"
    finetune_lr: float = 0.01
    kd: bool = True                    # distil from the unpruned model during finetune
    temperature: float = 4.0
    batch_size: int = 64
    eval_samples: int | None = None    # None = whole validation split
    measure_latency: bool = False
    latency_batch: int = 1
    latency_runs: int = 20
    threads: int = 1
    seed: int = 0
    fidelity: str = "full"             # copied into Metrics.fidelity (e.g. "cheap" for GA step 1)

    def __post_init__(self) -> None:
        if not isinstance(self.recovery, str) or not self.recovery:
            raise ValueError(f"recovery must be a non-empty string, got {self.recovery!r}")
        from evaluators.recover import available_recoveries  # lazy: recover imports this module

        known = available_recoveries()
        if self.recovery not in known:
            raise ValueError(f"unknown recovery {self.recovery!r} (known: {', '.join(known)})")
        _check_int("calibration_samples", self.calibration_samples, 1)
        _check_int("bn_batches", self.bn_batches, 1)
        _check_int("finetune_steps", self.finetune_steps, 0)
        _check_positive("finetune_lr", self.finetune_lr)
        if not isinstance(self.kd, bool):
            raise ValueError(f"kd must be true or false, got {self.kd!r}")
        _check_positive("temperature", self.temperature)
        _check_int("batch_size", self.batch_size, 1)
        if self.eval_samples is not None:
            _check_int("eval_samples", self.eval_samples, 1)
        if not isinstance(self.measure_latency, bool):
            raise ValueError(f"measure_latency must be true or false, got {self.measure_latency!r}")
        _check_int("latency_batch", self.latency_batch, 1)
        _check_int("latency_runs", self.latency_runs, 1)
        _check_int("threads", self.threads, 1)
        _check_int("seed", self.seed, 0)
        if not isinstance(self.fidelity, str) or not self.fidelity:
            raise ValueError(f"fidelity must be a non-empty string, got {self.fidelity!r}")

    @property
    def calibration_batch_size(self) -> int:
        """Batch size that cuts ``calibration_samples`` into ``bn_batches`` batches."""
        return max(1, math.ceil(self.calibration_samples / self.bn_batches))

    def replace(self, **changes: Any) -> "EvalSettings":
        """A validated copy with ``changes`` applied."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalSettings":
        """Settings from a mapping (e.g. a TOML table); unknown keys are errors."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown evaluation setting(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return cls(**data)
