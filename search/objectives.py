"""Task metrics as objectives and constraints: how a study names what its task measures.

A task declares its metrics up front (``evaluators.tasks.declared_metrics``: a built-in's
registration, or ``@declare_metrics`` on a plugin's factory), so a config can name them
before the task is built: ``objectives = ["perplexity", "flops"]``, ``[constraints]
max_perplexity = 8``. ``resolve_config`` (run by ``StudyConfig``) registers each named task
metric as an objective (``evaluators.metrics.task_objective``) and its constraint key
(``max_<name>`` for a metric to minimise, ``min_<name>`` for one to maximise) in
``search.config.CONSTRAINTS``; the task's module is imported only when the config names a
metric no registry knows, so configs that name only built-ins read as they always did.
``check_measured`` (``search.setup.prepare``, after the task is loaded) refuses a quality
objective or constraint the loaded task does not measure (e.g. ``accuracy`` for a language
model). Every failure is one ``ConfigError`` line, before anything is written.
"""

from __future__ import annotations

from typing import Any

from evaluators.metrics import MINIMIZE, OBJECTIVES, TaskValue, task_objective

# the built-in objectives that are costs: every other objective is a quality the task measures
_COSTS = ("flops", "params", "latency_ms", "latency_ratio")


def constraint_key(name: str, direction: str) -> str:
    """The ``[constraints]`` key bounding metric ``name``: ``max_`` when minimised, ``min_`` when maximised."""
    return f"{'max' if direction == MINIMIZE else 'min'}_{name}"


def resolve_config(config: Any) -> None:
    """Register the task metrics ``config``'s objectives and task constraints name;
    ``ConfigError`` for a name neither a built-in objective nor a metric the task declares."""
    from search.config import CONSTRAINTS, ConfigError

    unknown = [o for o in config.study.objectives if o not in OBJECTIVES]
    bounds = [k for k in config.constraints.task_bounds if k not in CONSTRAINTS]
    if not unknown and not bounds:
        return
    declared = _declared(config)
    for name in unknown:
        if name not in declared:
            known = ", ".join(sorted(set(OBJECTIVES.names()) | set(declared)))
            raise ConfigError(f"[study] objectives: unknown objective {name!r} (known: {known}; task "
                              f"{config.task.name!r} measures {', '.join(declared)})")
        register(name, declared[name])
    keys = {constraint_key(n, d): (n, d) for n, d in declared.items()}
    for key in bounds:
        if key not in keys:
            known = ", ".join(sorted(set(CONSTRAINTS) | set(keys)))
            raise ConfigError(f"unknown key {key!r} in [constraints] (known: {known}); remove or rename it")
        register(*keys[key])


def register(name: str, direction: str) -> None:
    """``name`` as an objective and its constraint key (``ConfigError`` on a clash)."""
    from search.config import CONSTRAINTS, ConfigError

    try:
        task_objective(name, direction)
    except ValueError as exc:
        raise ConfigError(f"[task]: {exc}") from None
    CONSTRAINTS.setdefault(constraint_key(name, direction), name)


def _declared(config: Any) -> dict[str, str]:
    from evaluators.tasks import declared_metrics
    from search.config import ConfigError

    try:
        return declared_metrics(config.task.name)
    except ValueError as exc:
        raise ConfigError(f"[task] {config.task.name!r}: {exc}") from None


def quality_names(config: Any) -> list[str]:
    """The objectives and constrained metrics of ``config`` that the task must measure."""
    from search.config import CONSTRAINTS

    names = [o for o in config.study.objectives if o not in _COSTS]
    names += [CONSTRAINTS[k] for k in config.constraints.names if CONSTRAINTS.get(k) not in _COSTS]
    return list(dict.fromkeys(names))


def check_measured(config: Any, task: Any) -> None:
    """``ConfigError`` when an objective or constraint of ``config`` is a quality metric the
    loaded ``task`` does not measure (or measures in the other direction)."""
    from search.config import ConfigError

    measures = dict(task.metric_directions)
    for name in quality_names(config):
        objective = OBJECTIVES.get(name)
        if name != "accuracy" and not isinstance(objective.read, TaskValue):
            continue  # an objective derived from Metrics' fields (register_objective), not a task metric
        if name not in measures:
            raise ConfigError(f"[study] objectives/[constraints] name {name!r}, but task {config.task.name!r} "
                              f"measures {', '.join(measures)}: use those")
        if measures[name] != objective.direction:
            raise ConfigError(f"task {config.task.name!r} metric {name!r} is to {measures[name]}, "
                              f"not {objective.direction}")


