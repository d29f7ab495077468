"""StudyConfig: a study described in TOML, validated before anything is written.

Sections (all but ``[study]``, ``[task]`` and ``[[searchers]]`` optional)::

    [study]        name, storage, seed, n_trials, timeout_s, objectives, workers,
                   threads_per_worker, window, eval_timeout_s, max_retries, log_file
    [task]         name ("digits", "image-folder" or "package.module:callable"), cache_dir
    [task.options] passed to the task
    [space]        ratio_min, ratio_max, ratio_step, methods, method_per_group, recoveries,
                   round_to, ignored
    [evaluation]   fields of evaluators.settings.EvalSettings (the "full" fidelity)
    [constraints]  max_flops_ratio, max_params_ratio, max_latency_ms, min_accuracy
    [[searchers]]  kind, name (default: kind), share; [searchers.options] per kind
    [export]       dir, finetune_steps, formats

Unknown keys are errors. Relative paths (storage file, cache, export dir, log file)
resolve against the current working directory, like every command-line tool's paths.
The default storage is ``sqlite:///studies/<name>.db``.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from evaluators.metrics import MINIMIZE, OBJECTIVES, get_objective

# Constraint name -> objective it bounds: ``max_<metric>`` for an objective to minimise
# (value - bound), ``min_<metric>`` for one to maximise (bound - value).
CONSTRAINTS: dict[str, str] = {
    f"{'max' if objective.direction == MINIMIZE else 'min'}_{objective.metric}": name
    for name, objective in OBJECTIVES.items() if objective.metric
}
EXPORT_FORMATS = ("pt2", "onnx")
# Violation recorded for a constraint whose metric was not measured (finite: JSON-safe).
UNMEASURED = 1e6
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class ConfigError(ValueError):
    """Bad input: the message says what is wrong, where, and what to do."""


def _where(section: str, key: str | None = None) -> str:
    return f"[{section}]" + (f" {key}" if key else "")


def _int(section: str, key: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{_where(section, key)} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{_where(section, key)} must be >= {minimum}, got {value}")
    return value


def _number(section: str, key: str, value: Any, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{_where(section, key)} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{_where(section, key)} must be >= {minimum}, got {value}")
    return float(value)


def _str(section: str, key: str, value: Any, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise ConfigError(f"{_where(section, key)} must be a {'' if empty else 'non-empty '}string, got {value!r}")
    return value


def _str_list(section: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{_where(section, key)} must be a list of strings, got {value!r}")
    return tuple(value)


def _check_keys(section: str, data: Mapping[str, Any], cls: type, extra: Sequence[str] = ()) -> None:
    known = {f.name for f in fields(cls)} | set(extra)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} in {_where(section)} (known: {', '.join(sorted(known))}); remove or rename it"
        )


@dataclass(frozen=True)
class StudySection:
    name: str
    storage: str = ""
    seed: int = 0
    n_trials: int | None = None
    timeout_s: float = 0.0
    objectives: tuple[str, ...] = ("accuracy", "flops")
    workers: int = 1
    threads_per_worker: int = 1
    window: int = 2
    eval_timeout_s: float = 0.0
    max_retries: int = 2
    log_file: str = ""

    def __post_init__(self) -> None:
        s = "study"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(
                f"[study] name {self.name!r} must be 1-100 characters of letters, digits, '.', '_' or '-' "
                "(it names files)"
            )
        _str(s, "storage", self.storage, empty=True)
        _int(s, "seed", self.seed, 0)
        if self.n_trials is not None:
            _int(s, "n_trials", self.n_trials)
            if self.n_trials <= 0:
                raise ConfigError(f"[study] n_trials must be > 0, got {self.n_trials} (omit it to run until timeout_s)")
        object.__setattr__(self, "timeout_s", _number(s, "timeout_s", self.timeout_s, 0.0))
        if self.n_trials is None and self.timeout_s == 0:
            raise ConfigError("[study] sets no budget: give n_trials > 0 and/or timeout_s > 0")
        objectives = _str_list(s, "objectives", self.objectives)
        for name in objectives:
            try:
                get_objective(name)
            except ValueError as exc:
                raise ConfigError(f"[study] objectives: {exc}") from None
        if not objectives or len(set(objectives)) != len(objectives):
            raise ConfigError(f"[study] objectives must be non-empty and distinct, got {list(objectives)}")
        object.__setattr__(self, "objectives", objectives)
        _int(s, "workers", self.workers, 1)
        _int(s, "threads_per_worker", self.threads_per_worker, 1)
        _int(s, "window", self.window, 1)
        object.__setattr__(self, "eval_timeout_s", _number(s, "eval_timeout_s", self.eval_timeout_s, 0.0))
        _int(s, "max_retries", self.max_retries, 0)
        _str(s, "log_file", self.log_file, empty=True)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///studies/{self.name}.db"

    @property
    def log_path(self) -> Path:
        return Path(self.log_file or f"studies/logs/{self.name}.log")

    @property
    def directions(self) -> tuple[str, ...]:
        return tuple(get_objective(o).direction for o in self.objectives)


@dataclass(frozen=True)
class TaskSection:
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    cache_dir: str = "studies/cache"

    def __post_init__(self) -> None:
        _str("task", "name", self.name)
        if not isinstance(self.options, Mapping):
            raise ConfigError(f"[task.options] must be a table, got {self.options!r}")
        object.__setattr__(self, "options", dict(self.options))
        _str("task", "cache_dir", self.cache_dir)


@dataclass(frozen=True)
class SpaceSection:
    ratio_min: float = 0.2
    ratio_max: float = 1.0
    ratio_step: float = 0.05
    methods: tuple[str, ...] = ("l1",)
    method_per_group: bool = False
    recoveries: tuple[str, ...] = ()
    round_to: int = 1
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        s = "space"
        for key in ("ratio_min", "ratio_max", "ratio_step"):
            object.__setattr__(self, key, _number(s, key, getattr(self, key)))
        object.__setattr__(self, "methods", _str_list(s, "methods", self.methods))
        if not isinstance(self.method_per_group, bool):
            raise ConfigError(f"[space] method_per_group must be true or false, got {self.method_per_group!r}")
        object.__setattr__(self, "recoveries", _str_list(s, "recoveries", self.recoveries))
        _int(s, "round_to", self.round_to, 1)
        object.__setattr__(self, "ignored", _str_list(s, "ignored", self.ignored))

    def space_options(self) -> dict[str, Any]:
        """Keyword arguments of ``SearchSpace`` (everything but ``ignored``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "ignored"}


@dataclass(frozen=True)
class ConstraintsSection:
    """Bounds on objectives' values; each key is a ``CONSTRAINTS`` name."""

    max_flops_ratio: float | None = None
    max_params_ratio: float | None = None
    max_latency_ms: float | None = None
    max_latency_ratio: float | None = None
    min_accuracy: float | None = None

    def __post_init__(self) -> None:
        for key in self.names:
            value = _number("constraints", key, getattr(self, key), 0.0)
            if key != "max_latency_ms" and value > 1.0 + 1e-12:
                raise ConfigError(f"[constraints] {key} is a ratio in (0, 1], got {value}")
            object.__setattr__(self, key, value)

    @property
    def names(self) -> tuple[str, ...]:
        """The constraints set, in field order (the order of a trial's constraint values)."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name) is not None)

    def values(self, metrics: Any) -> tuple[float, ...]:
        """Constraint values of ``metrics`` (Optuna's convention: <= 0 feasible)."""
        out = []
        for name in self.names:
            objective = get_objective(CONSTRAINTS[name])
            bound = getattr(self, name)
            value = objective.value(metrics)
            if value is None or not math.isfinite(value):
                out.append(UNMEASURED)  # not measured: cannot be shown feasible
            elif objective.direction == MINIMIZE:
                out.append(float(value) - bound)
            else:
                out.append(bound - float(value))
        return tuple(out)


@dataclass(frozen=True)
class LatencySection:
    """How latency is known during search: a measured lookup table (NetAdapt-style) built
    once per (model, batch, threads, machine) and cached, or per-evaluation measurement."""

    table: bool = True
    batch: int = 1
    threads: int = 1
    runs: int = 15
    warmup: int = 3
    levels: tuple[float, ...] = (0.25, 0.5, 0.75)
    calibration: int = 16
    predictor: str = "fitted"

    def __post_init__(self) -> None:
        if not isinstance(self.table, bool):
            raise ConfigError(f"[latency] table must be true or false, got {self.table!r}")
        object.__setattr__(self, "levels", tuple(self.levels))
        try:
            self.settings()
        except ValueError as exc:
            raise ConfigError(f"[latency]: {exc}") from None

    def settings(self) -> Any:
        from spaces.latency import LatencySettings

        return LatencySettings(batch=self.batch, threads=self.threads, runs=self.runs, warmup=self.warmup,
                               levels=self.levels, calibration=self.calibration, predictor=self.predictor)


@dataclass(frozen=True)
class SearcherSection:
    kind: str
    name: str = ""
    share: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _str("searchers", "kind", self.kind)
        name = _str("searchers", "name", self.name, empty=True) or self.kind
        if not _NAME.match(name):
            raise ConfigError(f"[[searchers]] name {name!r} must be letters, digits, '.', '_' or '-'")
        object.__setattr__(self, "name", name)
        share = _number("searchers", "share", self.share)
        if share <= 0:
            raise ConfigError(f"[[searchers]] share of {name!r} must be > 0, got {share}")
        object.__setattr__(self, "share", share)
        if not isinstance(self.options, Mapping):
            raise ConfigError(f"[searchers.options] of {name!r} must be a table, got {self.options!r}")
        object.__setattr__(self, "options", dict(self.options))


@dataclass(frozen=True)
class ExportSection:
    dir: str = "studies/exports"
    finetune_steps: int = 0
    formats: tuple[str, ...] = ("pt2",)

    def __post_init__(self) -> None:
        _str("export", "dir", self.dir)
        _int("export", "finetune_steps", self.finetune_steps, 0)
        formats = _str_list("export", "formats", self.formats)
        for f in formats:
            if f not in EXPORT_FORMATS:
                raise ConfigError(f"[export] formats: unknown format {f!r} (known: {', '.join(EXPORT_FORMATS)})")
        object.__setattr__(self, "formats", formats)


@dataclass(frozen=True)
class StudyConfig:
    """A whole study: what to search, how to evaluate, where to record, what to export."""

    study: StudySection
    task: TaskSection
    searchers: tuple[SearcherSection, ...]
    space: SpaceSection = field(default_factory=SpaceSection)
    evaluation: Any = None  # evaluators.settings.EvalSettings
    constraints: ConstraintsSection = field(default_factory=ConstraintsSection)
    export: ExportSection = field(default_factory=ExportSection)
    watermark: Any = None  # spaces.watermark.WatermarkConfig, or None for no watermark
    latency: LatencySection = field(default_factory=LatencySection)
    source: str = ""

    def __post_init__(self) -> None:
        from evaluators.settings import EvalSettings
        from search.base import build_options

        if self.evaluation is None:
            object.__setattr__(self, "evaluation", EvalSettings(seed=self.study.seed))
        if not self.searchers:
            raise ConfigError("no [[searchers]] given: add at least one, e.g. [[searchers]] kind = \"tpe\"")
        names = [s.name for s in self.searchers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"[[searchers]] name {dupes[0]!r} is used twice: give each searcher a distinct name")
        for s in self.searchers:
            try:
                build_options(s.kind, s.options)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"[[searchers]] {s.name!r}: {exc}") from None
        if self.uses_latency and not (self.latency.table or self.evaluation.measure_latency):
            raise ConfigError(
                "latency is an objective or constraint but neither [latency] table nor [evaluation] "
                "measure_latency is true: enable one"
            )
        if self.evaluation.fidelity != "full":
            raise ConfigError(f"[evaluation] fidelity must stay 'full' (the Pareto front's fidelity), got {self.evaluation.fidelity!r}")

    # -- derived --------------------------------------------------------------------------
    @property
    def uses_latency(self) -> bool:
        c = self.constraints
        return (any(o in self.study.objectives for o in ("latency_ms", "latency_ratio"))
                or c.max_latency_ms is not None or c.max_latency_ratio is not None)

    @property
    def name(self) -> str:
        return self.study.name

    @property
    def shares(self) -> dict[str, float]:
        total = sum(s.share for s in self.searchers)
        return {s.name: s.share / total for s in self.searchers}

    def with_overrides(self, **changes: Any) -> "StudyConfig":
        """A copy with ``[study]`` fields replaced (command-line overrides); ``None`` = keep."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        try:
            study = replace(self.study, **changes)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        evaluation = self.evaluation
        if "seed" in changes:
            evaluation = evaluation.replace(seed=study.seed)
        return replace(self, study=study, evaluation=evaluation)

    # -- reading --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "") -> "StudyConfig":
        from evaluators.settings import EvalSettings

        known = {"study", "task", "space", "evaluation", "constraints", "searchers", "export", "watermark", "latency"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown section [{unknown[0]}] (known: {', '.join(sorted(known))}); remove or rename it")
        for required in ("study", "task", "searchers"):
            if required not in data:
                raise ConfigError(f"missing section [{required}]" if required != "searchers"
                                  else "no [[searchers]] given: add at least one, e.g. [[searchers]] kind = \"tpe\"")

        def table(name: str) -> dict[str, Any]:
            value = data.get(name, {})
            if not isinstance(value, Mapping):
                raise ConfigError(f"[{name}] must be a table, got {type(value).__name__}")
            return dict(value)

        def build(section: str, cls_: type, values: dict[str, Any], required: Sequence[str] = ()) -> Any:
            _check_keys(section, values, cls_)
            for key in required:
                if key not in values:
                    raise ConfigError(f"{_where(section, key)} is missing")
            try:
                return cls_(**values)
            except ConfigError:
                raise
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{_where(section)}: {exc}") from None

        study = build("study", StudySection, table("study"), required=("name",))
        task = build("task", TaskSection, table("task"), required=("name",))
        space = build("space", SpaceSection, table("space"))
        constraints = build("constraints", ConstraintsSection, table("constraints"))
        export = build("export", ExportSection, table("export"))
        latency = build("latency", LatencySection, table("latency"))
        evaluation_data = table("evaluation")
        evaluation_data.setdefault("seed", study.seed)
        try:
            evaluation = EvalSettings.from_dict(evaluation_data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[evaluation]: {exc}") from None
        raw = data.get("searchers")
        if not isinstance(raw, list) or not all(isinstance(s, Mapping) for s in raw):
            raise ConfigError("[[searchers]] must be an array of tables: write each as [[searchers]] kind = \"...\"")
        searchers = tuple(build("searchers", SearcherSection, dict(s), required=("kind",)) for s in raw)
        watermark = None
        if "watermark" in data:
            from spaces.watermark import WatermarkConfig

            try:  # key_file is resolved against the working directory, like every path here
                watermark = WatermarkConfig.from_dict(table("watermark"))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"[watermark]: {exc}") from None
        return cls(study=study, task=task, searchers=searchers, space=space, evaluation=evaluation,
                   constraints=constraints, export=export, watermark=watermark, latency=latency, source=source)


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate a study TOML file; every problem is a one-line ``ConfigError``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found: check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return StudyConfig.from_dict(data, source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
