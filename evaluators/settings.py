"""EvalSettings: how one policy is evaluated (recovery, data budget, latency, threads, device, seed)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from evaluators.devices import check_device
from evaluators.latency_table import MOVED_KEYS, LatencyConfig
from spaces.checks import check_bool, check_int, check_number, check_str


@dataclass(frozen=True)
class EvalSettings:
    """Everything an evaluation of a policy depends on besides the policy and the task.

    Calibration data: ``calibration_samples`` samples of the task's calibration split,
    cut into ``bn_batches`` batches; adaptive BN uses all of them, importance criteria
    and compensation receive the same batches. With ``measure_latency`` every evaluation
    times the pruned model against the unpruned one with ``latency``'s batch, runs and
    warmup (the study's ``[latency]`` table).

    ``device`` (``evaluators.devices``): where pruning, recovery, measurement and timing
    run; ``"auto"`` is CUDA when the evaluating process sees a GPU. Only the name is
    checked here; whether the device exists is checked where the work runs.

    ``repeats``: the policy is built (pruned and recovered) and measured that many times,
    with seeds ``seed``, ``seed + 1``, ...; the task's values are their mean. For recoveries that
    draw random batches (fine-tunes), whose result moves by a point or more with the seed.
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
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    threads: int = 1
    device: str = "auto"               # "auto" | "cpu" | "cuda" | "cuda:N"
    seed: int = 0
    repeats: int = 1                   # build-and-measure runs, seeds seed .. seed + repeats - 1, averaged
    fidelity: str = "full"             # copied into Metrics.fidelity (e.g. "cheap" for GA step 1)

    def __post_init__(self) -> None:
        check_str("recovery", self.recovery)
        from evaluators.recover import available_recoveries  # lazy: recover imports this module

        known = available_recoveries()
        if self.recovery not in known:
            raise ValueError(f"unknown recovery {self.recovery!r} (known: {', '.join(known)})")
        check_int("calibration_samples", self.calibration_samples, 1)
        check_int("bn_batches", self.bn_batches, 1)
        check_int("finetune_steps", self.finetune_steps, 0)
        check_number("finetune_lr", self.finetune_lr, positive=True)
        check_bool("kd", self.kd)
        check_number("temperature", self.temperature, positive=True)
        check_int("batch_size", self.batch_size, 1)
        if self.eval_samples is not None:
            check_int("eval_samples", self.eval_samples, 1)
        check_bool("measure_latency", self.measure_latency)
        if isinstance(self.latency, Mapping):  # read back from a study's stored settings
            object.__setattr__(self, "latency", LatencyConfig.from_dict(self.latency))
        if not isinstance(self.latency, LatencyConfig):
            raise ValueError(f"latency must be a LatencyConfig, got {self.latency!r}")
        check_int("threads", self.threads, 1)
        check_device("device", self.device)
        check_int("seed", self.seed, 0)
        check_int("repeats", self.repeats, 1)
        check_str("fidelity", self.fidelity)

    @property
    def calibration_batch_size(self) -> int:
        """Batch size that cuts ``calibration_samples`` into ``bn_batches`` batches."""
        return max(1, math.ceil(self.calibration_samples / self.bn_batches))

    def replace(self, **changes: Any) -> "EvalSettings":
        """A validated copy with ``changes`` applied."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (``latency`` as its table)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["latency"] = self.latency.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalSettings":
        """Settings from a mapping (``to_dict``'s output, an ``[evaluation]`` table); unknown
        keys are errors, and so are the latency keys that now live in ``[latency]``."""
        for key in sorted(set(data) & set(MOVED_KEYS)):
            raise ValueError(f"{key} is now [latency] {MOVED_KEYS[key]}: move it to the [latency] table")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown evaluation setting(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return cls(**data)
