"""StudyConfig: a study described in TOML, validated before anything is written.

Each section is the frozen config of the layer that uses it; StudyConfig only composes
them and adds what needs the registries (objective, method and recovery names)::

    [study]        name, storage, seed, n_trials, timeout_s, objectives, workers,
                   threads_per_worker, gpus_per_worker, window, eval_timeout_s, max_retries,
                   log_file
    [task]         name ("digits", "image-folder" or "package.module:callable"), cache_dir
    [task.options] passed to the task
    [space]        spaces.space.SpaceConfig: ratio_min, ratio_max, ratio_step, methods,
                   method_per_group, recoveries, round_to, ignored
    [evaluation]   evaluators.settings.EvalSettings (the "full" fidelity)
    [latency]      evaluators.latency_table.LatencyConfig: table, batch, threads, runs,
                   warmup, levels, calibration, predictor
    [constraints]  max_flops_ratio, max_params_ratio, max_latency_ms, max_latency_ratio,
                   min_accuracy, and max_<m>/min_<m> for a metric m the task declares
    [[searchers]]  kind, name (default: kind), share; [searchers.options] per kind
    [promotion]    search.promotion.PromotionConfig: steps, eta, levels, recovery,
                   eval_samples, repeats
    [fill]         spaces.fill.FillConfig: levels (every proposal grown to the FLOPs level above it)
    [export]       dir, finetune_steps, formats
    [watermark]    spaces.watermark.WatermarkConfig

Unknown keys are errors. Relative paths (storage file, cache, export dir, log file)
resolve against the current working directory, like every command-line tool's paths.
The default storage is ``sqlite:///studies/<name>.db``.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from evaluators.latency_table import LatencyConfig
from evaluators.metrics import MINIMIZE, OBJECTIVES, get_objective
from evaluators.settings import EvalSettings
from spaces.checks import check_int, check_keys, check_number, check_str, check_str_list
from spaces.fill import FillConfig
from spaces.space import SpaceConfig
from search.promotion import PromotionConfig
from spaces.watermark import WatermarkConfig

# Constraint name -> objective it bounds: ``max_<metric>`` for an objective to minimise
# (value - bound), ``min_<metric>`` for one to maximise (bound - value).
CONSTRAINTS: dict[str, str] = {
    f"{'max' if objective.direction == MINIMIZE else 'min'}_{objective.metric}": name
    for name, objective in OBJECTIVES.items() if objective.metric
}
LATENCY_OBJECTIVES = ("latency_ms", "latency_ratio")
EXPORT_FORMATS = ("pt2", "onnx")
# Violation recorded for a constraint whose metric was not measured (finite: JSON-safe).
UNMEASURED = 1e6
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SECTIONS = ("study", "task", "space", "evaluation", "constraints", "searchers", "export", "watermark", "latency",
             "promotion", "fill")
NO_SEARCHERS = "no [[searchers]] given: add at least one, e.g. [[searchers]] kind = \"tpe\""


class ConfigError(ValueError):
    """Bad input: the message says what is wrong, where, and what to do."""


def _check(check: Callable[..., Any], section: str, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
    """``check(f"[section] key", value, ...)`` with its ``ValueError`` as a ``ConfigError``."""
    try:
        return check(f"[{section}] {key}", value, *args, **kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _at_least(section: str, key: str, value: Any, minimum: float, check: Callable[..., Any] = check_int) -> Any:
    value = _check(check, section, key, value)
    if value < minimum:
        raise ConfigError(f"[{section}] {key} must be >= {minimum}, got {value}")
    return value


def check_space_names(config: SpaceConfig) -> None:
    """``ValueError`` for a method or recovery of ``config`` that no registry knows."""
    from evaluators.importance import available_importances
    from evaluators.recover import available_recoveries

    for kind, names, known in (("method", config.methods, available_importances()),
                               ("recovery", config.recoveries, available_recoveries())):
        for name in names:
            if name not in known:
                raise ValueError(f"unknown {kind} {name!r} (known: {', '.join(sorted(known))})")


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
    gpus_per_worker: float = 0.0  # Ray num_gpus of each evaluation worker; 0.5 = two workers per GPU

    def __post_init__(self) -> None:
        s = "study"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(
                f"[study] name {self.name!r} must be 1-100 characters of letters, digits, '.', '_' or '-' "
                "(it names files)"
            )
        _check(check_str, s, "storage", self.storage, empty=True)
        _at_least(s, "seed", self.seed, 0)
        if self.n_trials is not None and _check(check_int, s, "n_trials", self.n_trials) <= 0:
            raise ConfigError(f"[study] n_trials must be > 0, got {self.n_trials} (omit it to run until timeout_s)")
        object.__setattr__(self, "timeout_s", _at_least(s, "timeout_s", self.timeout_s, 0.0, check_number))
        if self.n_trials is None and self.timeout_s == 0:
            raise ConfigError("[study] sets no budget: give n_trials > 0 and/or timeout_s > 0")
        objectives = _check(check_str_list, s, "objectives", self.objectives)  # names: search.objectives
        if not objectives or len(set(objectives)) != len(objectives):
            raise ConfigError(f"[study] objectives must be non-empty and distinct, got {list(objectives)}")
        object.__setattr__(self, "objectives", objectives)
        for key in ("workers", "threads_per_worker", "window"):
            _at_least(s, key, getattr(self, key), 1)
        object.__setattr__(self, "eval_timeout_s", _at_least(s, "eval_timeout_s", self.eval_timeout_s, 0.0,
                                                             check_number))
        _at_least(s, "max_retries", self.max_retries, 0)
        _check(check_str, s, "log_file", self.log_file, empty=True)
        gpus = _at_least(s, "gpus_per_worker", self.gpus_per_worker, 0.0, check_number)
        if gpus > 1 and not gpus.is_integer():  # Ray's rule for num_gpus
            raise ConfigError(f"[study] gpus_per_worker must be a fraction below 1 or a whole number, got {gpus:g}")
        object.__setattr__(self, "gpus_per_worker", gpus)

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
        _check(check_str, "task", "name", self.name)
        if not isinstance(self.options, Mapping):
            raise ConfigError(f"[task.options] must be a table, got {self.options!r}")
        object.__setattr__(self, "options", dict(self.options))
        _check(check_str, "task", "cache_dir", self.cache_dir)


@dataclass(frozen=True)
class ConstraintsSection:
    """Bounds on objectives' values; each key is a ``CONSTRAINTS`` name. ``task_bounds``
    holds ``max_<m>``/``min_<m>`` of the task's own metrics (any finite number; checked
    against the task's declared metrics by ``search.objectives``), read like the fields."""

    max_flops_ratio: float | None = None
    max_params_ratio: float | None = None
    max_latency_ms: float | None = None
    max_latency_ratio: float | None = None
    min_accuracy: float | None = None
    task_bounds: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in self._fixed:
            value = _at_least("constraints", key, getattr(self, key), 0.0, check_number)
            if key != "max_latency_ms" and value > 1.0 + 1e-12:
                raise ConfigError(f"[constraints] {key} is a ratio in (0, 1], got {value}")
            object.__setattr__(self, key, value)
        if not isinstance(self.task_bounds, Mapping):
            raise ConfigError(f"[constraints] task_bounds must be a table, got {self.task_bounds!r}")
        object.__setattr__(self, "task_bounds", {k: _check(check_number, "constraints", k, v)
                                                 for k, v in sorted(self.task_bounds.items())})

    def __getattr__(self, name: str) -> Any:  # a task metric's bound, e.g. max_perplexity
        bounds = self.__dict__.get("task_bounds", {})
        if name in bounds:
            return bounds[name]
        raise AttributeError(name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ConstraintsSection":
        """The section from its table: ``max_<m>``/``min_<m>`` keys that are no field are task bounds."""
        own = {f.name for f in fields(cls)} - {"task_bounds"}
        extra = {k: v for k, v in data.items() if k not in own and re.match(r"^(max|min)_[a-z][a-z0-9_]*$", k)}
        check_keys("[constraints]", {k: v for k, v in data.items() if k not in extra}, own)
        return cls(**{k: v for k, v in data.items() if k in own}, task_bounds=extra)

    @property
    def _fixed(self) -> tuple[str, ...]:  # the built-in constraints set, in field order
        return tuple(f.name for f in fields(self) if f.name != "task_bounds" and getattr(self, f.name) is not None)

    @property
    def names(self) -> tuple[str, ...]:
        """The constraints set, built-ins then task bounds (the order of a trial's constraint values)."""
        return self._fixed + tuple(self.task_bounds)

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
class SearcherSection:
    kind: str
    name: str = ""
    share: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(check_str, "searchers", "kind", self.kind)
        name = _check(check_str, "searchers", "name", self.name, empty=True) or self.kind
        if not _NAME.match(name):
            raise ConfigError(f"[[searchers]] name {name!r} must be letters, digits, '.', '_' or '-'")
        object.__setattr__(self, "name", name)
        share = _check(check_number, "searchers", "share", self.share)
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
        _check(check_str, "export", "dir", self.dir)
        _check(check_int, "export", "finetune_steps", self.finetune_steps, 0)
        formats = _check(check_str_list, "export", "formats", self.formats)
        for f in formats:
            if f not in EXPORT_FORMATS:
                raise ConfigError(f"[export] formats: unknown format {f!r} (known: {', '.join(EXPORT_FORMATS)})")
        object.__setattr__(self, "formats", formats)


@dataclass(frozen=True)
class StudyConfig:
    """A whole study: what to search, how to evaluate, where to record, what to export.

    ``latency`` is the one latency configuration: ``evaluation.latency`` is set to it.
    """

    study: StudySection
    task: TaskSection
    searchers: tuple[SearcherSection, ...]
    space: SpaceConfig = field(default_factory=SpaceConfig)
    evaluation: EvalSettings | None = None  # default: EvalSettings seeded with the study's seed
    constraints: ConstraintsSection = field(default_factory=ConstraintsSection)
    export: ExportSection = field(default_factory=ExportSection)
    watermark: WatermarkConfig | None = None  # None: no watermark
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    fill: FillConfig | None = None  # None: proposals are evaluated as proposed
    source: str = ""

    def __post_init__(self) -> None:
        from search.objectives import resolve_config
        resolve_config(self)  # task metrics named as objectives/constraints: registered, or one line
        evaluation = self.evaluation or EvalSettings(seed=self.study.seed)
        if evaluation.latency != self.latency:
            evaluation = evaluation.replace(latency=self.latency)
        object.__setattr__(self, "evaluation", evaluation)
        try:
            check_space_names(self.space)
        except ValueError as exc:
            raise ConfigError(f"[space]: {exc}") from None
        from search.config_checks import check_fill, check_promotion, check_searchers
        check_searchers(self)
        if self.uses_latency and not (self.latency.table or evaluation.measure_latency):
            raise ConfigError(
                "latency is an objective or constraint but neither [latency] table nor [evaluation] "
                "measure_latency is true: enable one"
            )
        if evaluation.fidelity != "full":
            raise ConfigError(f"[evaluation] fidelity must stay 'full' (the Pareto front's fidelity), got {evaluation.fidelity!r}")
        check_promotion(self)
        check_fill(self)

    @property
    def fill_levels(self) -> tuple[float, ...]:
        """The FLOPs levels ``[fill]`` grows proposals to (its own, else the FLOPs constraint)."""
        return () if self.fill is None else self.fill.levels_under(self.constraints.max_flops_ratio)

    # -- derived --------------------------------------------------------------------------
    @property
    def uses_latency(self) -> bool:
        c = self.constraints
        return (any(o in self.study.objectives for o in LATENCY_OBJECTIVES)
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
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section [{unknown[0]}] (known: {', '.join(sorted(_SECTIONS))}); remove or rename it")
        for required in ("study", "task"):
            if required not in data:
                raise ConfigError(f"missing section [{required}]")
        if "searchers" not in data:
            raise ConfigError(NO_SEARCHERS)
        study = _section(data, "study", StudySection, required=("name",))
        evaluation = _table(data, "evaluation")
        evaluation.setdefault("seed", study.seed)
        if "latency" in evaluation:
            raise ConfigError("[evaluation] latency: latency settings live in the [latency] table; move them there")
        raw = data.get("searchers")
        if not isinstance(raw, list) or not all(isinstance(s, Mapping) for s in raw):
            raise ConfigError("[[searchers]] must be an array of tables: write each as [[searchers]] kind = \"...\"")
        return cls(
            study=study,
            task=_section(data, "task", TaskSection, required=("name",)),
            searchers=tuple(_built("searchers", SearcherSection, dict(s), required=("kind",)) for s in raw),
            space=_section(data, "space", SpaceConfig.from_dict),
            evaluation=_built("evaluation", EvalSettings.from_dict, evaluation),
            constraints=_section(data, "constraints", ConstraintsSection.from_dict),
            export=_section(data, "export", ExportSection),
            # key_file is resolved against the working directory, like every path here
            watermark=_section(data, "watermark", WatermarkConfig.from_dict) if "watermark" in data else None,
            latency=_section(data, "latency", LatencyConfig.from_dict),
            promotion=_section(data, "promotion", PromotionConfig.from_dict),
            fill=_section(data, "fill", FillConfig.from_dict) if "fill" in data else None,
            source=source,
        )


def _table(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{name}] must be a table, got {type(value).__name__}")
    return dict(value)


def _section(data: Mapping[str, Any], name: str, build: Callable[..., Any], required: Sequence[str] = ()) -> Any:
    return _built(name, build, _table(data, name), required)


def _built(section: str, build: Callable[..., Any], values: dict[str, Any], required: Sequence[str] = ()) -> Any:
    """``build`` applied to a section's table; unknown keys and bad values as one ``ConfigError`` line.

    ``build`` is a config class (its fields are the known keys) or a ``from_dict`` that
    checks its own keys."""
    if isinstance(build, type):
        try:
            check_keys(f"[{section}]", values, (f.name for f in fields(build)))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    for key in required:
        if key not in values:
            raise ConfigError(f"[{section}] {key} is missing")
    try:
        return build(**values) if isinstance(build, type) else build(values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith("unknown key") and f"[{section}]" in message
                          else f"[{section}]: {message}") from None


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
