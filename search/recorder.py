"""The one writer of trial data: creates the trial of every proposal and records its outcome.

Trial layout (what optuna-dashboard shows): params = group names (+ ``method`` ...);
user attrs ``note`` (one readable line: searcher, criterion, recovery, ratio range), ``searcher``, ``generation``, ``fidelity``, ``policy`` (JSON), ``run`` (the
launcher's run id), ``settings`` (evaluation-setting overrides, only when the proposal has
them), ``meta`` (only when non-empty) at creation, and ``metrics`` (every Metrics field plus
``constraints``: name -> value) at the end, one write; constraint values also go through
``trial.set_constraint`` so Optuna's samplers and ``best_trials`` see them. A trial promoted
to fine-tune rungs (``search.promotion``) has an intermediate value per rung (step = its
fine-tune steps, 0 for the proxy) and user attr ``promotion``; its ``metrics`` and values
are the highest rung's.

Every trial is created here, in one of two ways: a proposal with fixed params (``open``:
one transaction, RUNNING from birth), or a trial a searcher's Optuna sampler fills in
(``trial_source(sampler).ask()``: the sampler needs the trial to sample its params; the
searcher turns them into its policy and ``open`` then writes the proposal's attrs on it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from evaluators.metrics import Metrics
from search.base import Outcome, Proposal
from search.params import distributions
from search.records import TrialRecord


@dataclass(frozen=True)
class SampledTrial:
    """A RUNNING trial whose params a searcher's sampler chose."""

    trial: optuna.trial.Trial
    params: dict[str, Any]

    @property
    def number(self) -> int:
        return self.trial.number

    def sampler_attrs(self) -> dict[str, Any]:
        """What the sampler noted on the trial (e.g. NSGA-II's ``<Sampler>:generation``)."""
        return dict(self.trial.storage.get_trial_system_attrs(self.trial._trial_id))


class TrialSource:
    """Creates one searcher's trials with its own sampler (its own study handle)."""

    def __init__(self, storage: optuna.storages.BaseStorage, study_name: str,
                 sampler: optuna.samplers.BaseSampler, space: Any) -> None:
        self._study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
        self._distributions = distributions(space)

    def ask(self, fixed: Mapping[str, Any] | None = None) -> SampledTrial:
        """A new trial sampled over the space; ``fixed`` params are queued for it first, so
        the sampler records them as its own trial. The driver opens the trial right after
        this call, before any other ask of this launcher."""
        if fixed is not None:
            self._study.enqueue_trial(dict(fixed))
        trial = self._study.ask(self._distributions)
        return SampledTrial(trial, dict(trial.params))


# System attr optuna-dashboard (0.21) reads a trial's constraint values from: a list in
# ``[constraints]`` order. Optuna 5 reads it too, as constraints named "0", "1", ... beside
# the named ones ``set_constraint`` writes (``search.records`` keeps the named ones).
DASHBOARD_CONSTRAINTS = "constraints"


def trial_note(label: str, proposal: Proposal) -> str:
    """One line a person reads in the dashboard: searcher, criterion, recovery, ratio range."""
    policy = proposal.policy
    ratios = list(policy.ratios.values()) or [1.0]
    method = policy.method if isinstance(policy.method, str) else "per group"
    parts = [label, f"method {method}", f"ratios {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} groups"]
    if policy.recovery:
        parts.insert(2, f"recovery {policy.recovery}")
    if proposal.fidelity != "full":
        parts.append(f"fidelity {proposal.fidelity}")
    return " | ".join(parts)


class TrialRecorder:
    """Creates and finishes the trials of proposals; the only writer of trial data."""

    def __init__(self, storage: optuna.storages.BaseStorage, study_name: str, *, space: Any,
                 settings: Any, objectives: Sequence[str], constraints: Any, run_id: str = "") -> None:
        from evaluators.metrics import get_objective

        self.storage = storage
        self.study_name = study_name
        self.study_id = storage.get_study_id_from_name(study_name)
        self.space = space
        self.settings = settings
        self.objectives = tuple(objectives)
        self._objectives = tuple(get_objective(o) for o in self.objectives)
        self.constraints = constraints
        self.run_id = run_id
        self._distributions = distributions(space)
        # Handle for trials whose params the driver fixes; its sampler never samples.
        self.fixed_study = optuna.load_study(study_name=study_name, storage=storage,
                                             sampler=optuna.samplers.RandomSampler(seed=0))

    def _attrs(self, label: str, proposal: Proposal) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "note": trial_note(label, proposal),
            "searcher": label,
            "generation": proposal.generation,
            "fidelity": proposal.fidelity,
            "policy": proposal.policy.to_json(),
        }
        if self.run_id:
            attrs["run"] = self.run_id
        if proposal.settings is not None:
            attrs["settings"] = self.settings_overrides(proposal)
        if proposal.meta:
            attrs["meta"] = dict(proposal.meta)
        return attrs

    def settings_overrides(self, proposal: Proposal) -> dict[str, Any]:
        """The evaluation settings in which ``proposal`` differs from the study's."""
        if proposal.settings is None:
            return {}
        base, own = self.settings.to_dict(), proposal.settings.to_dict()
        return {k: v for k, v in own.items() if base.get(k) != v}

    def trial_source(self, sampler: optuna.samplers.BaseSampler) -> TrialSource:
        """Where a sampler-backed searcher gets its trials (see ``Searcher.bind``)."""
        return TrialSource(self.storage, self.study_name, sampler, self.space)

    def open(self, label: str, proposal: Proposal) -> optuna.trial.Trial:
        """The RUNNING trial of ``proposal``, with its attrs (created here unless a sampler
        already created it: ``proposal.trial``)."""
        attrs = self._attrs(label, proposal)
        if proposal.trial is not None:
            trial = proposal.trial.trial
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            return trial
        # One transaction with every param and attr; the trial is RUNNING from birth, so
        # no other asker can pick it up (unlike enqueue_trial's WAITING trials).
        template = optuna.trial.create_trial(
            state=TrialState.RUNNING,
            params=self.space.to_params(proposal.policy),
            distributions=self._distributions,
            user_attrs=attrs,
        )
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=template)
        return optuna.trial.Trial(self.fixed_study, trial_id)

    def values_of(self, metrics: Metrics) -> tuple[float, ...] | None:
        if not metrics.ok:
            return None
        values = tuple(o.value(metrics) for o in self._objectives)
        if any(v is None or not math.isfinite(v) for v in values):
            return None
        return tuple(float(v) for v in values)

    def report(self, trial: optuna.trial.Trial, step: int, score: float) -> None:
        """Record a rung's score as the trial's intermediate value at ``step`` (straight to
        storage: ``Trial.report`` refuses multi-objective studies)."""
        self.storage.set_trial_intermediate_value(trial._trial_id, step, score)

    def finish(self, trial: optuna.trial.Trial, proposal: Proposal, metrics: Metrics,
               cached_from: int | None = None, promotion: Mapping[str, Any] | None = None) -> Outcome:
        """Record ``metrics`` and tell the study; returns the searcher's :class:`Outcome`."""
        values = self.values_of(metrics)
        if values is None and metrics.error is None:
            missing = [name for name, o in zip(self.objectives, self._objectives) if o.value(metrics) is None]
            metrics = Metrics.failure(f"objective(s) {', '.join(missing) or 'values'} not measured",
                                      metrics.eval_seconds, metrics.fidelity)
        constraints = self.constraints.values(metrics) if values is not None else ()
        names = self.constraints.names
        record = metrics.to_dict()
        record["constraints"] = dict(zip(names, constraints))
        if cached_from is not None:
            record["cached_from"] = cached_from
        trial.set_user_attr("metrics", _jsonable(record))
        if promotion:
            trial.set_user_attr("promotion", _jsonable(dict(promotion)))
        if values is not None:
            for name, value in zip(names, constraints):
                trial.set_constraint(name, value)
            if names:  # optuna-dashboard 0.21 shows the older list form (system attr "constraints")
                self.storage.set_trial_system_attr(trial._trial_id, DASHBOARD_CONSTRAINTS, list(constraints))
            trial.study.tell(trial, list(values))
        else:
            trial.study.tell(trial, state=TrialState.FAIL)
        return Outcome(proposal, metrics, values, constraints, number=trial.number)

    def fail_stale(self, record: TrialRecord, reason: str) -> None:
        """Mark a RUNNING trial of a dead launcher FAIL (not counted in the budget)."""
        self.storage.set_trial_user_attr(record.trial_id, "stale", reason)
        self.storage.set_trial_state_values(record.trial_id, TrialState.FAIL)

    def fail_over_budget(self, trial_id: int, reason: str) -> None:
        """Mark a just-created trial FAIL (user attr ``over_budget``, not counted): other launchers filled the budget between this launcher's check and the
        trial's creation. Optuna cannot delete a trial; this is the only way to take it back.
        """
        self.storage.set_trial_user_attr(trial_id, "over_budget", reason)
        self.storage.set_trial_state_values(trial_id, TrialState.FAIL)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
