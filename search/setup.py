"""A study's set-up: everything that can fail on bad input, checked before anything is written.

``prepare`` loads the task and the search space over it, checks that the constraints are
reachable, builds the watermark and the searchers, checks an existing study's
space/objectives/evaluation against the config and builds the latency table; the result,
``Prepared``, is what ``search.runner``, ``search.export`` and the CLI work from.
``start_ray`` starts (or joins and checks) Ray with CPUs for the evaluation workers and
every searcher's own Ray tasks, before anything is written; ``open_study`` is the first write
of a run; ``default_pool`` starts the Ray workers. ``check_device`` refuses an ``[evaluation]
device`` naming CUDA that the run cannot have (``prepare`` on this machine; ``start_ray`` on
the cluster, where workers with ``[study] gpus_per_worker`` get their GPUs from Ray).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from search.base import Searcher, SearcherContext, make_searcher
from search.config import ConfigError, StudyConfig
from spaces.fill import BudgetFill
from search.pool import Pool
from search.storage import (
    STUDY_ATTR_BASE,
    STUDY_ATTR_CONSTRAINTS,
    STUDY_ATTR_EVALUATION,
    STUDY_ATTR_FINGERPRINT,
    STUDY_ATTR_OBJECTIVES,
    STUDY_ATTR_TASK,
    StorageSpec,
    check_compatible,
    find_study,
    inspect_storage,
    open_storage,
    parse_storage,
)


@dataclass
class Prepared:
    """Everything validated, nothing written: task, space, searchers, storage location."""

    config: StudyConfig
    task: Any
    space: Any
    spec: StorageSpec
    searchers: dict[str, Searcher]
    existing: bool
    watermark: Any = None   # spaces.watermark.Watermark: every evaluated policy is projected onto it
    fill: Any = None        # spaces.fill.BudgetFill: every evaluated policy is grown to its FLOPs level
    latency_table: Any = None  # spaces.latency.LatencyTable: latency_ms of every trial during search
    rejudge: bool = False  # constraints changed and the run allows it: search.study_change.rejudge before the run


PoolFactory = Callable[[Prepared, str | None], Pool]

log = logging.getLogger(__name__)


def fingerprint_of(config: StudyConfig, space: Any, task: Any) -> dict[str, Any]:
    """What identifies a study's search space (stored with the study, compared on resume)."""
    fp = dict(space.fingerprint())
    fp["task"] = config.task.name
    if config.watermark is not None:  # non-secret scheme only: the key never reaches storage
        fp["watermark"] = config.watermark.scheme()
    if config.fill is not None:  # what is evaluated is the grown policy
        fp["fill"] = list(config.fill_levels)
    return fp


def searcher_seed(seed: int, index: int, salt: str | None = None) -> int:
    entropy = [int(seed), int(index)] + ([int(salt, 16)] if salt is not None else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def make_context(config: StudyConfig, space: Any, index: int, task: Any = None,
                 salt: str | None = None) -> SearcherContext:
    """The context of searcher ``index``; ``salt`` (a launcher's hex run id) gives it its own seed."""
    section = config.searchers[index]
    return SearcherContext(
        task=task,
        space=space,
        objectives=config.study.objectives,
        directions=config.study.directions,
        settings=config.evaluation,
        seed=searcher_seed(config.study.seed, index, salt),
        label=section.name,
        constraint_names=config.constraints.names,
        max_flops_ratio=config.constraints.max_flops_ratio,
    )


def make_searchers(config: StudyConfig, space: Any, task: Any, salt: str | None = None) -> dict[str, Searcher]:
    """Every searcher of ``config``, in config order (``ConfigError`` on bad options)."""
    searchers: dict[str, Searcher] = {}
    for i, section in enumerate(config.searchers):
        try:
            searchers[section.name] = make_searcher(section.kind, make_context(config, space, i, task, salt),
                                                    section.options)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"[[searchers]] {section.name!r}: {exc}") from None
    return searchers


def load_task_and_space(config: StudyConfig) -> tuple[Any, Any]:
    """The task (training its base model on first use) and the search space over it."""
    from evaluators.tasks import load_task
    from spaces.space import SearchSpace

    try:
        task = load_task(config.task.name, config.task.options, cache_dir=config.task.cache_dir)
    except ValueError as exc:
        raise ConfigError(f"[task] {config.task.name!r}: {exc}") from None
    try:
        space = SearchSpace.from_model(
            task.base_model(), task.example_inputs, config.space
        )
    except ValueError as exc:
        raise ConfigError(f"[space]: {exc}") from None
    return task, space


def check_constraints_reachable(config: StudyConfig, space: Any) -> None:
    c = config.constraints
    smallest = space.predict_cost(space.uniform(space.ratio_min))
    base = space.base_cost
    for name, bound, reachable in (
        ("max_flops_ratio", c.max_flops_ratio, smallest.flops / base.flops),
        ("max_params_ratio", c.max_params_ratio, smallest.params / base.params),
    ):
        if bound is not None and bound < reachable - 1e-12:
            raise ConfigError(
                f"[constraints] {name} = {bound} is below what the space can reach "
                f"({reachable:.4f} with every group at ratio_min {space.ratio_min}): raise it or lower [space] ratio_min"
            )


def build_watermark(config: StudyConfig, space: Any) -> Any:
    """The study's watermark over ``space`` (None without a [watermark] section)."""
    if config.watermark is None:
        return None
    from spaces.watermark import Watermark

    try:
        return Watermark.from_space(space, config.watermark)
    except ValueError as exc:
        raise ConfigError(f"[watermark]: {exc}") from None


def check_existing_study(config: StudyConfig, spec: StorageSpec, space: Any, task: Any) -> bool:
    """Whether the storage already holds the study (``ConfigError`` when it does not match)."""
    with inspect_storage(spec) as storage:
        summary = find_study(storage, config.name) if storage is not None else None
        if summary is None:
            return False
        check_compatible(
            summary,
            fingerprint=fingerprint_of(config, space, task),
            objectives=config.study.objectives,
            evaluation=config.evaluation.to_dict(),
            where=config.study.storage_url,
        )
        return True


def prepare(config: StudyConfig, *, task_and_space: tuple[Any, Any] | None = None,
            allow_changed_constraints: bool = False) -> Prepared:
    """Validate everything that can be wrong with the input; write nothing to storage.

    An existing study judged with other ``[constraints]`` is refused unless
    ``allow_changed_constraints`` (then ``Prepared.rejudge``: see ``search.study_change``)."""
    from search.objectives import check_measured
    from search.study_change import check_constraints

    spec = parse_storage(config.study.storage_url)
    check_device(config)
    task, space = task_and_space if task_and_space is not None else load_task_and_space(config)
    check_measured(config, task)  # objectives/constraints name metrics this task measures
    check_constraints_reachable(config, space)
    watermark = build_watermark(config, space)
    fill = BudgetFill(space, config.fill_levels) if config.fill is not None else None
    searchers = make_searchers(config, space, task)
    existing = check_existing_study(config, spec, space, task)
    rejudge = existing and check_constraints(config, allow=allow_changed_constraints)
    latency_table = latency_table_of(config, task, space) if config.uses_latency and config.latency.table else None
    return Prepared(config=config, task=task, space=space, spec=spec, searchers=searchers, existing=existing,
                    watermark=watermark, fill=fill, latency_table=latency_table, rejudge=rejudge)


def latency_table_of(config: StudyConfig, task: Any, space: Any) -> Any:
    """The study's latency table, measured here on ``[evaluation] device`` (or read from the cache)."""
    from evaluators.devices import resolve_device
    from evaluators.latency_table import build_latency_table

    try:
        resolve_device(config.evaluation.device)
    except ValueError as exc:  # a device this machine lacks: the table is measured here, on the driver
        raise ConfigError(f"[latency] table: {exc}") from None
    return build_latency_table(task.base_model(), task.example_inputs, space, config.latency,
                               cache_dir=config.task.cache_dir, device=config.evaluation.device)


def ray_cpus(config: StudyConfig, searchers: Mapping[str, Searcher]) -> int:
    """The Ray CPUs a study holds at once: its evaluation workers' plus every searcher's
    own Ray tasks (``Searcher.ray_resources``)."""
    s = config.study
    return s.workers * s.threads_per_worker + sum(x.ray_resources().cpus for x in searchers.values())


def ray_gpus(config: StudyConfig) -> float:
    """The Ray GPUs the evaluation workers hold at once (``workers * gpus_per_worker``)."""
    return config.study.workers * config.study.gpus_per_worker


def local_gpus(config: StudyConfig) -> int | None:
    """GPUs a local Ray started for the run declares: ``None`` (Ray counts the machine's own)
    unless the workers ask for GPUs on a machine without CUDA; then the whole number they
    ask for, so their actors are scheduled (they run on the CPU: ``check_device`` refuses a
    device naming CUDA there)."""
    import torch

    need = ray_gpus(config)
    return math.ceil(need) if need > 0 and not torch.cuda.is_available() else None


def check_device(config: StudyConfig, on_cluster: bool | None = None) -> None:
    """``ConfigError`` when ``[evaluation] device`` names CUDA (or a GPU index) this machine
    lacks, or a GPU index a worker given ``gpus_per_worker`` GPUs by Ray cannot see. The
    machine check is skipped when the workers get GPUs from Ray (``gpus_per_worker`` > 0) on
    a cluster or where it is not yet known whether the run joins one (``on_cluster`` None):
    the cluster's GPUs are checked by ``start_ray``."""
    from evaluators.devices import resolve_device

    device, gpus = config.evaluation.device, config.study.gpus_per_worker
    if device in ("auto", "cpu"):
        return
    visible = max(1, int(gpus))  # what Ray makes visible to a worker given GPUs: cuda:0 .. cuda:visible-1
    if gpus > 0 and device.startswith("cuda:") and int(device.split(":")[1]) >= visible:
        raise ConfigError(f"[evaluation] device {device!r}: with [study] gpus_per_worker = {gpus:g} each "
                          f"worker sees only the {visible} GPU(s) Ray gives it (cuda:0..cuda:{visible - 1}): "
                          "use device = \"cuda\"")
    if gpus > 0 and on_cluster is not False:
        return
    try:
        resolve_device(config.evaluation.device)
    except ValueError as exc:
        raise ConfigError(f"[evaluation] {exc}") from None


def start_ray(prepared: Prepared, ray_address: str | None = None) -> None:
    """Start local Ray with ``ray_cpus`` CPUs, or join the cluster (``ray_address``,
    ``RAY_ADDRESS``, or a Ray already initialised in this process) and check its CPUs.

    ``ConfigError`` when a searcher's Ray tasks could never be scheduled next to the
    evaluation workers (``evaluators.pool.check_cluster_cpus``); a warning when the cluster
    covers each task but not everything at once.
    """
    import os

    import ray

    from evaluators.pool import check_cluster_cpus, ensure_ray
    from evaluators.ray_cluster import check_cluster_gpus

    config = prepared.config
    joined = bool(ray_address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())
    check_device(config, on_cluster=joined)
    ensure_ray(ray_address, ray_cpus(config, prepared.searchers), None if joined else local_gpus(config))
    tasks = {}
    for name, searcher in prepared.searchers.items():
        need = searcher.ray_resources()
        tasks[f"searcher {name!r}"] = (need.tasks, need.cpus_per_task)
    total = float(ray.cluster_resources().get("CPU", 0))
    try:
        warnings = [check_cluster_cpus(total, config.study.workers, config.study.threads_per_worker, tasks),
                    check_cluster_gpus(float(ray.cluster_resources().get("GPU", 0)), config.study.workers,
                                       config.study.gpus_per_worker)]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for warning in filter(None, warnings):
        log.warning(warning)


def default_pool(prepared: Prepared, ray_address: str | None = None) -> Pool:
    """The Ray ``EvaluatorPool`` the study's ``[study]`` section describes."""
    from evaluators.pool import EvaluatorPool

    s = prepared.config.study
    return EvaluatorPool(
        prepared.task,
        groups=prepared.space.groups,
        round_to=prepared.space.round_to,
        settings=prepared.config.evaluation,
        workers=s.workers,
        threads_per_worker=s.threads_per_worker,
        timeout_s=s.eval_timeout_s or None,
        max_retries=s.max_retries,
        window=s.window,
        ray_address=ray_address,
        ray_cpus=ray_cpus(prepared.config, prepared.searchers),
        gpus_per_worker=s.gpus_per_worker,
        ray_gpus=local_gpus(prepared.config),
    )


def open_study(prepared: Prepared) -> tuple[optuna.storages.BaseStorage, optuna.Study]:
    """Open the storage and load or create the study (the first write of a run)."""
    config = prepared.config
    storage = open_storage(prepared.spec)
    study = optuna.create_study(
        study_name=config.name,
        storage=storage,
        directions=list(config.study.directions),
        load_if_exists=True,
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    if STUDY_ATTR_FINGERPRINT not in study.user_attrs:
        study.set_user_attr(STUDY_ATTR_FINGERPRINT, fingerprint_of(config, prepared.space, prepared.task))
        study.set_user_attr(STUDY_ATTR_OBJECTIVES, list(config.study.objectives))
        study.set_user_attr(STUDY_ATTR_EVALUATION, config.evaluation.to_dict())
        study.set_user_attr(STUDY_ATTR_TASK, {"name": config.task.name, "options": dict(config.task.options)})
    _record_reference(study, prepared)
    return storage, study


def _record_reference(study: optuna.Study, prepared: Prepared) -> None:
    """The objectives' names (what optuna-dashboard labels them), the constraint bounds
    trials are judged with and the unpruned model's metrics, once per study (also for a
    study set up before they were recorded)."""
    import warnings

    from search.baseline import measure_base
    from search.study_change import bounds_of

    if study.metric_names is None:
        with warnings.catch_warnings():  # set_metric_names is marked experimental since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(prepared.config.study.objectives))
    if STUDY_ATTR_CONSTRAINTS not in study.user_attrs:
        study.set_user_attr(STUDY_ATTR_CONSTRAINTS, bounds_of(prepared.config))
    if STUDY_ATTR_BASE not in study.user_attrs:
        base = measure_base(prepared.config, prepared.task)
        if base is not None:
            study.set_user_attr(STUDY_ATTR_BASE, base)
