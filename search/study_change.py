"""A study resumed with other ``[constraints]``: what changed, and re-judging every trial.

A finished trial's constraint values (Optuna's ``constraints:<name>`` trial system attrs,
which ``TrialRecord.feasible`` and the Pareto front read, and ``metrics["constraints"]``)
were computed against the bounds of the run that finished it. Resuming with other bounds
would judge old trials by the old bounds and new ones by the new: the front could then hold
a dominated trial. So a change is refused (``check_constraints``, before anything is
written) unless the run asks to re-judge (``--allow-changed-constraints``): ``rejudge`` then
recomputes every COMPLETE trial's constraint values from its stored metrics with
``ConstraintsSection.values``, exactly as ``search.recorder`` computed them.

The bounds a study was judged with are its user attr ``constraints`` (name -> bound, written
at set-up); a study made before that attr existed has them inferred from its trials.

Optuna never lets a finished trial change, so re-judging rewrites the study: its trials
(numbers, params, attrs, values, times) are copied with new constraint values into a fresh
study of the same name. The original is first copied to a backup study
``<name>.before-rejudge-<run id>``, deleted after the rewrite succeeded; if the rewrite
fails, the error names the backup, which holds every trial as it was.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evaluators.metrics import MINIMIZE, Metrics, get_objective
from search.config import CONSTRAINTS, UNMEASURED, ConfigError, StudyConfig
from search.launchers import GRACE_S, Launcher, other_live_launchers, read_launchers
from search.records import TrialRecord, read_trials
from search.storage import (
    STUDY_ATTR_CONSTRAINTS,
    close_storage,
    find_study,
    inspect_storage,
    open_storage,
    parse_storage,
)

log = logging.getLogger(__name__)

ALLOW_FLAG = "--allow-changed-constraints"
_CONSTRAINT_PREFIX = "constraints:"   # Optuna's system attr key of a named constraint value
_CONSTRAINT_LIST = "constraints"      # Optuna's older form: a list of values
_TOLERANCE = 1e-9


def bounds_of(config: StudyConfig) -> dict[str, float]:
    """The config's constraint bounds, name -> bound, in the order of a trial's values."""
    return {name: float(getattr(config.constraints, name)) for name in config.constraints.names}


def _bound_from(name: str, value: float, metrics: Metrics) -> float | None:
    """The bound that gave constraint value ``value`` for ``metrics`` (inverse of
    ``ConstraintsSection.values``), or None when the metric was not measured."""
    if name not in CONSTRAINTS or value is None or value >= UNMEASURED:
        return None
    objective = get_objective(CONSTRAINTS[name])
    measured = objective.value(metrics)
    if measured is None or not math.isfinite(measured):
        return None
    return float(measured) - value if objective.direction == MINIMIZE else value + float(measured)


def recorded_bounds(records: Sequence[TrialRecord]) -> dict[str, float] | None:
    """The bounds the COMPLETE trials were judged with, inferred from their recorded values
    (None when no trial was judged yet)."""
    bounds: dict[str, float] = {}
    judged = False
    for r in records:
        if r.state != TrialState.COMPLETE or r.metrics is None:
            continue
        judged = True
        for name, value in r.constraints.items():
            if name not in bounds:
                bound = _bound_from(name, value, r.metrics)
                if bound is not None:
                    bounds[name] = bound
    return bounds if judged else None


def describe_changes(old: Mapping[str, float], new: Mapping[str, float]) -> list[str]:
    """``["max_flops_ratio 0.6 -> 0.8", "min_accuracy (none) -> 0.5"]``; empty when equal."""
    changes = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is not None and b is not None and math.isclose(a, b, rel_tol=_TOLERANCE, abs_tol=_TOLERANCE):
            continue
        changes.append(f"{name} {'(none)' if a is None else f'{a:g}'} -> {'(none)' if b is None else f'{b:g}'}")
    return changes


def constraint_changes(user_attrs: Mapping[str, Any], records: Sequence[TrialRecord],
                       config: StudyConfig) -> list[str]:
    """How ``config``'s constraints differ from those the study's trials were judged with."""
    stored = user_attrs.get(STUDY_ATTR_CONSTRAINTS)
    old = dict(stored) if isinstance(stored, Mapping) else recorded_bounds(records)
    return [] if old is None else describe_changes(old, bounds_of(config))


def check_constraints(config: StudyConfig, *, allow: bool = False, command: str = "run") -> bool:
    """Whether the existing study must be re-judged before this run (read-only).

    ``ConfigError`` when the constraints changed and ``allow`` is false, or when another
    launcher is running the study (re-judging rewrites it under that launcher's feet).
    """
    spec = parse_storage(config.study.storage_url)
    with inspect_storage(spec) as storage:
        summary = find_study(storage, config.name) if storage is not None else None
        if summary is None:
            return False
        study = optuna.load_study(study_name=config.name, storage=storage)
        changes = constraint_changes(summary.user_attrs, read_trials(study), config)
        if not changes:
            return False
        where = f"study {config.name!r} in {config.study.storage_url}"
        if not allow:
            hint = (f"resume with `prunesearch run {config.source or 'CONFIG'} {ALLOW_FLAG}` to re-judge every trial's "
                    "feasibility from its stored metrics" if command == "run" else
                    f"run `prunesearch run {config.source or 'CONFIG'} {ALLOW_FLAG}` first to re-judge the trials")
            raise ConfigError(f"{where} was judged with other [constraints] ({'; '.join(changes)}): restore them, "
                              f"choose a new [study] name, or {hint}")
        study_id = storage.get_study_id_from_name(config.name)
        if other_live_launchers(read_launchers(storage, study_id), Launcher.current(), GRACE_S):
            raise ConfigError(f"{where}: {ALLOW_FLAG} rewrites the study, and another launcher is running it: "
                              "stop that launcher first")
        log.info("%s: constraints changed (%s); every trial is re-judged", where, "; ".join(changes))
        return True


def rejudged_trial(trial: FrozenTrial, config: StudyConfig) -> FrozenTrial:
    """``trial`` with its constraint values recomputed from its stored metrics (a COMPLETE
    trial; others, which carry no constraint values, are returned unchanged)."""
    raw = trial.user_attrs.get("metrics")
    if trial.state != TrialState.COMPLETE or not isinstance(raw, dict):
        return trial
    names = config.constraints.names
    values = config.constraints.values(Metrics.from_dict(raw))
    system = {k: v for k, v in trial.system_attrs.items()
              if not (k.startswith(_CONSTRAINT_PREFIX) or k == _CONSTRAINT_LIST)}
    system.update({_CONSTRAINT_PREFIX + n: float(v) for n, v in zip(names, values)})
    if _CONSTRAINT_LIST in trial.system_attrs:  # keep the older list form where it was written
        system[_CONSTRAINT_LIST] = [float(v) for v in values]
    user = dict(trial.user_attrs)
    user["metrics"] = {**raw, "constraints": dict(zip(names, (float(v) for v in values)))}
    out = copy.copy(trial)
    out.system_attrs = system
    out.user_attrs = user
    return out


def _copy_study(storage: Any, name: str, directions: Sequence[Any], user_attrs: Mapping[str, Any],
                system_attrs: Mapping[str, Any], trials: Sequence[FrozenTrial]) -> None:
    """A new study ``name`` holding ``trials`` in number order; its user attrs (the
    fingerprint among them) are written last, so a copy cut short is never mistaken for
    the study (``check_compatible`` refuses a study with trials and no fingerprint)."""
    study_id = storage.create_new_study(list(directions), name)
    for key, value in system_attrs.items():
        storage.set_study_system_attr(study_id, key, value)
    for trial in sorted(trials, key=lambda t: t.number):
        storage.create_new_trial(study_id, template_trial=trial)
    for key, value in user_attrs.items():
        storage.set_study_user_attr(study_id, key, value)


def rejudge(config: StudyConfig) -> int:
    """Recompute every COMPLETE trial's constraint values under ``config``'s constraints
    and store the new bounds; returns how many trials changed feasibility."""
    storage = open_storage(parse_storage(config.study.storage_url))
    try:
        return _rejudge(storage, config)
    finally:
        close_storage(storage)


def _rejudge(storage: Any, config: StudyConfig) -> int:
    study_id = storage.get_study_id_from_name(config.name)
    directions = storage.get_study_directions(study_id)
    user_attrs = dict(storage.get_study_user_attrs(study_id))
    system_attrs = dict(storage.get_study_system_attrs(study_id))
    trials = storage.get_all_trials(study_id, deepcopy=True)
    rewritten = [rejudged_trial(t, config) for t in trials]
    flipped = sum(TrialRecord.from_frozen(a).feasible != TrialRecord.from_frozen(b).feasible
                  for a, b in zip(trials, rewritten))
    backup = f"{config.name}.before-rejudge-{Launcher.current().run_id}"
    _copy_study(storage, backup, directions, user_attrs, system_attrs, trials)
    try:
        optuna.delete_study(study_name=config.name, storage=storage)
        _copy_study(storage, config.name, directions, {**user_attrs, STUDY_ATTR_CONSTRAINTS: bounds_of(config)},
                    system_attrs, rewritten)
    except Exception as exc:
        raise RuntimeError(f"re-judging study {config.name!r} failed ({type(exc).__name__}: {exc}); every trial as it "
                           f"was is in study {backup!r} of {config.study.storage_url}") from exc
    optuna.delete_study(study_name=backup, storage=storage)
    log.info("study %s re-judged under %s: %d of %d trial(s) changed feasibility", config.name,
             bounds_of(config), flipped, len(trials))
    return flipped
