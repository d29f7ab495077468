"""Trials as prunesearch reads them back (``TrialRecord``) and the Pareto front over them.

What a trial holds (user attrs, params) is described in ``search.recorder``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evaluators.metrics import Metrics
from search.base import FULL, MAXIMIZE, Outcome, Proposal
from spaces.policy import Policy


@dataclass(frozen=True)
class TrialRecord:
    """A trial as prunesearch reads it back: proposal, metrics, values, constraints."""

    number: int
    trial_id: int
    state: TrialState
    searcher: str
    generation: int
    fidelity: str
    policy: Policy | None
    metrics: Metrics | None
    values: tuple[float, ...] | None
    constraints: dict[str, float]
    run: str | None
    stale: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    cached_from: int | None = None
    params: dict[str, Any] = field(default_factory=dict)  # what the sampler recorded (Optuna params)
    promotion: dict[str, Any] = field(default_factory=dict)  # fine-tune rungs reached (search.promotion)

    @classmethod
    def from_frozen(cls, t: FrozenTrial) -> "TrialRecord":
        ua = t.user_attrs
        policy = None
        if isinstance(ua.get("policy"), str):
            try:
                policy = Policy.from_json(ua["policy"])
            except ValueError:
                policy = None
        raw = ua.get("metrics")
        metrics = Metrics.from_dict(raw) if isinstance(raw, dict) else None
        return cls(
            number=t.number,
            trial_id=t._trial_id,
            state=t.state,
            searcher=str(ua.get("searcher", "?")),
            generation=int(ua.get("generation", 0)),
            fidelity=str(ua.get("fidelity", FULL)),
            policy=policy,
            metrics=metrics,
            values=tuple(t.values) if t.values is not None else None,
            constraints=named_constraints(t.constraints),
            run=ua.get("run"),
            stale=bool(ua.get("stale", False)),
            settings=dict(ua.get("settings") or {}),
            meta=dict(ua.get("meta") or {}),
            cached_from=raw.get("cached_from") if isinstance(raw, dict) else None,
            params=dict(t.params),
            promotion=dict(ua.get("promotion") or {}),
        )

    @property
    def evaluated(self) -> bool:
        """Finished by an evaluation (COMPLETE, or FAIL with the evaluation's error)."""
        if self.state == TrialState.COMPLETE:
            return True
        return self.state == TrialState.FAIL and self.metrics is not None and self.metrics.error is not None

    @property
    def rung_steps(self) -> int:
        """Fine-tune steps of the rung whose metrics the trial holds (0: the proxy)."""
        return int(self.promotion.get("steps", 0))

    @property
    def eval_overrides(self) -> dict[str, Any]:
        """The evaluation-setting overrides that produced ``metrics`` (a promoted trial's
        include its rung's fine-tune)."""
        return {**self.settings, **dict(self.promotion.get("overrides") or {})}

    @property
    def feasible(self) -> bool:
        return self.state == TrialState.COMPLETE and all(v <= 0 for v in self.constraints.values())

    def proposal(self, base_settings: Any) -> Proposal:
        """The searcher's proposal; under a watermark ``policy`` is its projection and the
        searcher's own policy is in ``meta["proposal"]``."""
        settings = base_settings.replace(**self.settings) if self.settings else None
        meta = dict(self.meta)
        own = meta.pop("proposal", None)
        policy = Policy.from_json(own) if isinstance(own, str) else self.policy
        return Proposal(policy, generation=self.generation, settings=settings, meta=meta)

    def outcome(self, base_settings: Any, constraint_names: Sequence[str]) -> Outcome:
        metrics = self.metrics or Metrics.failure("no metrics recorded", fidelity=self.fidelity)
        values = self.values if self.state == TrialState.COMPLETE else None
        constraints = tuple(float(self.constraints.get(n, math.inf)) for n in constraint_names)
        return Outcome(self.proposal(base_settings), metrics, values, constraints, number=self.number)


def named_constraints(constraints: dict[str, float]) -> dict[str, float]:
    """A trial's constraint values by name: the positional copies ("0", "1", ...) of the
    list the recorder also writes for optuna-dashboard are left out when named ones exist."""
    named = {k: v for k, v in constraints.items() if not k.isdigit()}
    return named or dict(constraints)


def read_trials(study: optuna.Study) -> list[TrialRecord]:
    return [TrialRecord.from_frozen(t) for t in study.get_trials(deepcopy=False)]


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    better = False
    for x, y, d in zip(a, b, directions):
        if d != MAXIMIZE:
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def pareto_front(records: Sequence[TrialRecord], directions: Sequence[str]) -> list[TrialRecord]:
    """Feasible COMPLETE full-fidelity trials no other such trial dominates, one per policy,
    among the trials at the highest promotion rung any of them reached (fine-tuned and proxy
    scores are not comparable; see ``search.promotion``).

    Sorted by the second objective (e.g. FLOPs) ascending, then the first descending.
    """
    eligible = [r for r in records if r.feasible and r.fidelity == FULL and r.values is not None and r.policy is not None]
    top = max((r.rung_steps for r in eligible), default=0)
    pool: dict[str, TrialRecord] = {}
    for r in eligible:
        if r.rung_steps == top:
            pool.setdefault(r.policy.key(), r)  # duplicates of a policy: keep the first trial
    cands = list(pool.values())
    front = [r for r in cands if not any(dominates(o.values, r.values, directions) for o in cands if o is not r)]
    # equal values of different policies are all kept (neither dominates)
    def order(r: TrialRecord) -> tuple:
        signed = tuple(v if d != MAXIMIZE else -v for v, d in zip(r.values, directions))
        return signed[1:] + signed[:1] + (r.number,)

    return sorted(front, key=order)
