"""Multi-fidelity promotion: a cheap proxy for every trial, short fine-tunes for the best.

Every trial is first evaluated with the study's ``[evaluation]`` settings (the proxy, rung
0). With ``[promotion] steps = [s1, s2, ...]`` a trial whose proxy score is among the best
``1/eta`` of the proxy scores seen so far *at its FLOPs level* is evaluated again with a
fine-tune of ``s1`` steps (rung 1), and so on up the ladder: successive halving over
fine-tune steps, with Optuna's ``SuccessiveHalvingPruner`` promotion rule (the first
``eta - 1`` trials of a rung are promoted only when they are its best so far; Optuna
cannot suspend a trial and promote it later, nor can this driver) and a quota: at most
``ceil(n / eta)`` of the ``n`` trials that reached a rung at a level go on. Without the
quota a searcher that keeps improving keeps producing "best so far" trials and most of
them are promoted (TPE on shapes: 37 of 64 trials), so the cost of a study would depend
on how well it searches. Each rung re-prunes the
policy and fine-tunes from the recovered model (workers keep no state between
evaluations), so a rung's result does not depend on which rungs ran before it.

A promoted trial stays one Optuna trial: each rung's score is an intermediate value at
its fine-tune step count (step 0 = the proxy; optuna-dashboard plots them), the trial's
values and ``metrics`` are those of the highest rung it reached, and user attr
``promotion`` keeps the ladder (steps reached, the rung settings' overrides, each rung's
score and cost). ``search.records.pareto_front`` compares trials at the highest rung
reached in the study only: a proxy score and a fine-tuned one are not comparable.

FLOPs levels are ``levels`` equal bins of the FLOPs ratio over ``(0, max_flops_ratio]``
(or ``(0, 1]`` without that constraint), so promotion spends its fine-tunes along the
whole front instead of on the largest models. Only trials that meet every constraint not
on the score itself are promoted. The score is the study's first objective that is not a
cost (``accuracy`` by default).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evaluators.metrics import MAXIMIZE, Metrics, get_objective
from spaces.checks import check_int, check_keys, check_number, check_str

# Objectives that measure a model's cost; the score promoted on is the first other one.
COST_OBJECTIVES = frozenset({"flops", "params", "latency_ms", "latency_ratio"})


@dataclass(frozen=True)
class PromotionConfig:
    """``[promotion]``: the fine-tune rungs above the proxy and how many reach each."""

    steps: tuple[int, ...] = ()        # fine-tune steps of each rung above the proxy; () = off
    eta: float = 3.0                   # promote the best 1/eta of each rung per FLOPs level
    levels: int = 5                    # FLOPs levels (equal bins up to max_flops_ratio or 1)
    recovery: str = "finetune"         # the recovery of the promoted rungs
    eval_samples: int | None = None    # validation samples a rung is scored on (None: as [evaluation])
    repeats: int = 1                   # fine-tunes per rung evaluation (seeds seed, seed + 1, ...), averaged

    def __post_init__(self) -> None:
        steps = self.steps
        if not isinstance(steps, (list, tuple)):
            raise ValueError(f"steps must be a list of fine-tune step counts, got {steps!r}")
        for s in steps:
            check_int("steps", s, 1)
        if list(steps) != sorted(set(steps)):
            raise ValueError(f"steps must be strictly increasing, got {list(steps)}")
        object.__setattr__(self, "steps", tuple(steps))
        if check_number("eta", self.eta) <= 1:
            raise ValueError(f"eta must be > 1 (promote the best 1/eta), got {self.eta}")
        check_int("levels", self.levels, 1)
        check_str("recovery", self.recovery)
        if self.eval_samples is not None:
            check_int("eval_samples", self.eval_samples, 1)
        check_int("repeats", self.repeats, 1)

    @property
    def enabled(self) -> bool:
        return bool(self.steps)

    def overrides(self, rung: int) -> dict[str, Any]:
        """Evaluation-setting changes of ``rung`` (1..len(steps)) against the proxy's."""
        samples = {} if self.eval_samples is None else {"eval_samples": self.eval_samples}
        repeats = {} if self.repeats == 1 else {"repeats": self.repeats}
        return {"recovery": self.recovery, "finetune_steps": self.steps[rung - 1], **samples, **repeats}

    def to_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "eta": self.eta, "levels": self.levels, "recovery": self.recovery,
                "eval_samples": self.eval_samples, "repeats": self.repeats}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PromotionConfig":
        check_keys("[promotion]", data, ("steps", "eta", "levels", "recovery", "eval_samples", "repeats"))
        values = dict(data)
        if "steps" in values and isinstance(values["steps"], list):
            values["steps"] = tuple(values["steps"])
        return cls(**values)


def score_objective(objectives: Sequence[str]) -> str | None:
    """The objective promotion ranks by: the first that is not a cost (None if none)."""
    return next((o for o in objectives if o not in COST_OBJECTIVES), None)


@dataclass
class Ladder:
    """The promotion decisions of one study: each rung's scores per FLOPs level so far."""

    config: PromotionConfig
    score_name: str
    max_flops_ratio: float | None = None
    feasible: Any = None   # callable(metrics) -> bool: the constraints not on the score
    _scores: dict[tuple[int, int], list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    _promoted: collections.Counter = field(default_factory=collections.Counter)   # (rung, level) -> promoted

    @classmethod
    def for_study(cls, config: PromotionConfig, objectives: Sequence[str], constraints: Any) -> "Ladder":
        """The ladder of a study with ``objectives`` and ``constraints`` (a
        ``search.config.ConstraintsSection``): promoted trials must meet every constraint
        that does not bound the score."""
        from search.config import CONSTRAINTS

        score_name = score_objective(objectives)
        if score_name is None:
            raise ValueError("[promotion] needs an objective that is not a cost (e.g. accuracy) to rank by")
        names = constraints.names

        def feasible(metrics: Metrics) -> bool:
            values = constraints.values(metrics)
            return all(v <= 0 for n, v in zip(names, values) if CONSTRAINTS[n] != score_name)

        return cls(config, score_name, constraints.max_flops_ratio, feasible)

    @property
    def top(self) -> int:
        return len(self.config.steps)

    def step(self, rung: int) -> int:
        """Fine-tune steps of ``rung`` (0: the proxy)."""
        return 0 if rung == 0 else self.config.steps[rung - 1]

    def observe_record(self, record: Any) -> None:
        """Count the rungs a finished trial of an earlier run reached (its ``promotion``
        attr; a trial without one counts at the proxy rung)."""
        rungs = record.promotion.get("rungs") if record.promotion else None
        if record.metrics is None or not self.eligible(record.metrics):
            return
        if not rungs:
            if record.evaluated:
                self.observe(0, record.metrics)
            return
        for rung, entry in enumerate(rungs):
            score = entry.get("score")
            if score is not None and entry.get("flops_ratio") is not None:
                level = self.level(Metrics(flops_ratio=entry["flops_ratio"]))
                self._scores[(rung, level)].append(self._signed(float(score)))
                if rung + 1 < len(rungs):
                    self._promoted[(rung, level)] += 1

    def score(self, metrics: Metrics) -> float | None:
        value = get_objective(self.score_name).value(metrics)
        return None if value is None or not math.isfinite(value) else float(value)

    def level(self, metrics: Metrics) -> int:
        """FLOPs level of ``metrics``: 0 .. levels - 1 (above the bound: the last one).

        Levels are right-closed, ``(k / levels * bound, (k + 1) / levels * bound]``: a
        trial exactly at a level's upper edge (a FLOPs budget the levels are aligned to)
        competes with the trials under that budget, not with the larger ones above it."""
        ratio = metrics.flops_ratio if metrics.flops_ratio is not None else 1.0
        high = self.max_flops_ratio or 1.0
        return min(self.config.levels - 1, max(0, math.ceil(ratio / high * self.config.levels) - 1))

    def eligible(self, metrics: Metrics) -> bool:
        """A successful evaluation that meets the constraints not on the score."""
        return metrics.ok and self.score(metrics) is not None and (self.feasible is None or self.feasible(metrics))

    def observe(self, rung: int, metrics: Metrics) -> None:
        """Count a finished rung evaluation (also for trials read back on resume); trials
        that could never be promoted do not compete."""
        score = self.score(metrics)
        if self.eligible(metrics):
            self._scores[(rung, self.level(metrics))].append(self._signed(score))

    def promote(self, rung: int, metrics: Metrics) -> bool:
        """Observe rung ``rung``'s result; True if the trial goes on to rung ``rung + 1``."""
        self.observe(rung, metrics)
        if rung >= self.top or not self.eligible(metrics):
            return False
        score = self.score(metrics)
        key = (rung, self.level(metrics))
        competing = sorted(self._scores[key], reverse=True)
        # SuccessiveHalvingPruner's rule: the best len // eta; while fewer than eta
        # trials reached the rung, only a new best goes on.
        keep = max(1, int(len(competing) // self.config.eta))
        if self._signed(score) < competing[keep - 1]:
            return False
        if self._promoted[key] >= math.ceil(len(competing) / self.config.eta):
            return False   # the level's quota is spent until more trials reach the rung
        self._promoted[key] += 1
        return True

    def _signed(self, score: float) -> float:
        return score if get_objective(self.score_name).direction == MAXIMIZE else -score
