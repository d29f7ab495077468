"""Tasks: a model factory, its trained weights and the data an evaluation needs.

Built-ins (``available_tasks()``), each in its own module and registered with
``@register_task``: ``digits`` (:mod:`evaluators.digits`), ``image-folder``
(:mod:`evaluators.image_folder`), ``shapes`` (:mod:`evaluators.synthetic`), ``tokens``
(:mod:`evaluators.tokens`, a small transformer), and two worked examples of tasks with
their own metrics, loss and inputs: ``masks`` (:mod:`evaluators.regression`, dense
prediction scored by IoU and MSE) and ``markov-lm`` (:mod:`evaluators.language`, a causal
language model on dict inputs scored by perplexity).

A task scores a model by ``metrics(model, batches) -> {name: value}`` with a direction per
name (``metric_directions``) and trains it (fine-tune, gradient-based criteria) with
``loss(outputs, targets)`` and ``distill(student, teacher, temperature)``; the defaults are
top-1 accuracy, cross-entropy and Hinton's KD over the last axis. Inputs may be a tensor, a
tuple or a dict of tensors (``evaluators.batch``). The metric names are declared up front,
without building the task, so a study's objectives and constraints can name them before it
loads: ``@register_task(name, metrics={...})`` for a built-in, ``@declare_metrics(...)`` on a
plugin's factory (``declared_metrics``).

Any other spec of the form ``"package.module:callable"`` is a plugin: ``callable(**options)``
must return a :class:`Task`. A plugin that declares a ``cache_dir`` parameter also gets the
study's ``[task] cache_dir`` (a ``Path``) there, as the built-ins do, unless its options
already name one. Plugin modules are imported from ``sys.path`` and then from the working
directory, so ``mymod.py`` beside the study needs no ``PYTHONPATH=.`` (Ray workers get the
driver's working directory on their path as well).

A task from ``load_task`` carries its :class:`TaskSpec` (name, options, cache_dir and the
working directory it was loaded from): the Ray workers build their own copy of the task from
it (``TaskSpec.load``, the built-ins' weights read from the cache the first load wrote), so
no split's data travels through Ray's object store. ``dataclasses.replace`` on a task drops
the spec (its data may no longer be what the spec builds); so must code that changes a
loaded task's splits in place (``task.spec = None``).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from evaluators.batch import Batch, Inputs, check_inputs
from evaluators.datasets import Split, is_pair, read_batches, read_samples, samples_read, split_length
from evaluators.metrics import MAXIMIZE, MINIMIZE, OBJECTIVES, TaskValue
from spaces.checks import check_int
from spaces.registry import Registry

Tensor = torch.Tensor
SPLITS = ("train", "calibration", "validation")
DEFAULT_METRICS: Mapping[str, str] = {"accuracy": MAXIMIZE}
# a metric name is also a constraint key (max_<name> / min_<name>) and a table column
_METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


@dataclass
class Task:
    """A model architecture, its trained weights and the data to evaluate pruned copies on."""

    name: str
    build_model: Callable[[], nn.Module]      # the architecture, picklable (module-level fn / functools.partial)
    # each split: (x, y), x a tensor, tuple or dict of CPU tensors; or a map-style torch Dataset
    # of (inputs, target) items (evaluators.datasets; e.g. decoded lazily, per item)
    train: Split
    calibration: Split                        # small subset used by adaptive BN / importance / CaP
    validation: Split                         # the metrics are measured here
    example_inputs: Inputs                    # ONE sample (batch 1): costs are per sample
    num_classes: int
    base_state: dict[str, Tensor]             # trained weights of build_model()
    config: dict = field(default_factory=dict)  # what the task was built from (hashing / display)
    # the task's own quality metrics (None: top-1 accuracy), each name's direction, and the
    # losses recovery and the gradient-based criteria train with (None: cross-entropy, KD);
    # picklable (module-level functions): workers receive them with the task
    metrics: Callable[[nn.Module, Sequence[Batch]], Mapping[str, float]] | None = None
    metric_directions: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_METRICS))
    loss: Callable[[Any, Tensor], Tensor] | None = None
    distill: Callable[[Any, Any, float], Tensor] | None = None
    num_workers: int = 0                      # DataLoader processes reading a Dataset split
    # how to build this task again (set by load_task; not copied by dataclasses.replace)
    spec: TaskSpec | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not callable(self.build_model):
            raise ValueError(f"task {self.name!r}: build_model must be callable, got {type(self.build_model).__name__}")
        for split in SPLITS:
            _check_split(self.name, split, getattr(self, split))
        check_int(f"task {self.name!r}: num_workers", self.num_workers, 0)
        try:
            one = check_inputs("example_inputs", self.example_inputs)
        except ValueError:
            one = None
        if one != 1:
            raise ValueError(f"task {self.name!r}: example_inputs must be a tensor holding one sample (batch 1), "
                             "or a tuple or dict of such tensors")
        check_int(f"task {self.name!r}: num_classes", self.num_classes, 1)
        if not isinstance(self.base_state, Mapping):
            raise ValueError(f"task {self.name!r}: base_state must be a state_dict, got {type(self.base_state).__name__}")
        self.metric_directions = check_metric_directions(f"task {self.name!r}: metric_directions",
                                                         self.metric_directions)
        for key in ("metrics", "loss", "distill"):
            if getattr(self, key) is not None and not callable(getattr(self, key)):
                raise ValueError(f"task {self.name!r}: {key} must be callable or None")
        if self.metrics is None and self.metric_directions != DEFAULT_METRICS:
            raise ValueError(f"task {self.name!r}: metric_directions {self.metric_directions} need a metrics function")

    def base_model(self) -> nn.Module:
        """A fresh ``build_model()`` loaded with ``base_state``, in eval mode."""
        model = self.build_model()
        model.load_state_dict(self.base_state)
        return model.eval()

    def split(self, split: str) -> Split:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
        return getattr(self, split)

    def batches(
        self, split: str, batch_size: int, limit: int | None = None, seed: int | None = 0
    ) -> list[Batch]:
        """``split`` cut into batches of ``batch_size`` (``evaluators.datasets.read_batches``).

        Samples are shuffled by ``seed`` (``None`` keeps the stored order); ``limit`` caps
        the number of *samples* (not batches) taken after shuffling. A Dataset split is read
        through a ``DataLoader`` with ``num_workers`` processes, every batch at once.
        """
        return list(self.stream(split, batch_size, limit, seed))

    def stream(self, split: str, batch_size: int, limit: int | None = None, seed: int | None = 0) -> Sequence[Batch]:
        """``batches``, but a Dataset split's are decoded when read (``evaluators.datasets.Batches``):
        for one pass over a large split (scoring) without holding it."""
        check_int("batch_size", batch_size, 1)
        if limit is not None:
            try:
                check_int("limit", limit, 1)
            except ValueError:
                raise ValueError(f"limit must be None or an integer >= 1, got {limit!r}") from None
        return read_batches(self.split(split), batch_size, limit, seed, self.num_workers)

    def samples(self, split: str, index: Tensor) -> Batch:
        """The samples ``index`` of ``split`` as one batch (e.g. a fine-tune's random draws)."""
        return read_samples(self.split(split), index)

    def sample_count(self, split: str, limit: int | None = None) -> int:
        """Samples in ``split``; with ``limit``: how many a read of at most ``limit`` takes
        (what a scoring pass with ``eval_samples = limit`` scores), without reading them."""
        return samples_read(split_length(self.split(split)), limit)

    def sample_counts(self) -> dict[str, int]:
        """Samples in each split."""
        return {split: self.sample_count(split) for split in SPLITS}


@dataclass(frozen=True)
class TaskSpec:
    """What ``load_task`` built a task from, to build it again elsewhere (a Ray worker):
    ``load_task(name, options, cache_dir)`` run with ``workdir`` (the loading process's
    working directory) on the import path and a relative ``cache_dir`` read from there."""

    name: str
    options: Mapping[str, Any]
    cache_dir: str
    workdir: str | None = None

    def load(self, base_state: Mapping[str, Tensor] | None = None, samples: Mapping[str, int] | None = None) -> Task:
        """The task again: the same data and (from the cache, or ``base_state`` when given) the
        same base weights; ``ValueError`` when its splits do not hold ``samples`` (the sample
        counts where the spec was made: the spec builds other data here)."""
        cache_dir = Path(self.cache_dir)
        if self.workdir and os.path.isdir(self.workdir):  # absent on another machine: its own cwd is used
            if self.workdir not in sys.path:
                sys.path.append(self.workdir)  # appended, as _working_directory_importable does
            if not cache_dir.is_absolute():
                cache_dir = Path(self.workdir) / cache_dir
        task = load_task(self.name, copy.deepcopy(dict(self.options)), cache_dir)
        if base_state is not None:
            task.base_state = dict(base_state)
        if samples is not None and task.sample_counts() != dict(samples):
            raise ValueError(f"task {self.name!r} built here has samples {task.sample_counts()}, not {dict(samples)}")
        return task


def shipped(task: Task) -> tuple[Any, Any, Any]:
    """What another process needs to rebuild ``task`` (``unshipped``): its spec, base weights
    and sample counts, so no split's data is pickled; a task not from ``load_task`` whole."""
    if task.spec is None:
        return task, None, None
    return task.spec, dict(task.base_state), task.sample_counts()


def unshipped(payload: tuple[Any, Any, Any]) -> Task:
    """The task ``shipped`` described, built here (``TaskSpec.load``) or as it was sent."""
    source, base_state, samples = payload
    return source.load(base_state, samples) if isinstance(source, TaskSpec) else source


def _check_split(task: str, name: str, split: Any) -> None:
    """``ValueError`` unless ``split`` is a non-empty pair (x, y) or a non-empty map-style
    dataset whose first item is (inputs, target) (only that item is read)."""
    if is_pair(split):
        n = check_inputs(f"task {task!r}: {name} inputs", split[0])
        if n != len(split[1]):
            raise ValueError(f"task {task!r}: {name} has {n} inputs but {len(split[1])} labels")
    elif isinstance(split, torch.utils.data.Dataset) and hasattr(split, "__len__"):
        n = len(split)
        item = split[0] if n else None
        if n and not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"task {task!r}: {name} dataset items must be (inputs, target) pairs, "
                             f"got {type(item).__name__}")
    else:
        raise ValueError(f"task {task!r}: {name} must be a tuple (x, y) of inputs and a target tensor, "
                         "or a map-style torch Dataset of (inputs, target) items")
    if n == 0:
        raise ValueError(f"task {task!r}: {name} split is empty")


def check_metric_directions(name: str, value: Any) -> dict[str, str]:
    """``value`` as ``{metric: direction}``: a non-empty mapping of lower-case names (letters,
    digits, ``_``) to ``"maximize"``/``"minimize"``; ``ValueError`` (one line) otherwise."""
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{name} must be a non-empty mapping of metric name -> 'maximize'/'minimize', got {value!r}")
    for metric, direction in value.items():
        if not isinstance(metric, str) or not _METRIC_NAME.match(metric):
            raise ValueError(f"{name}: metric name {metric!r} must be lower-case letters, digits and '_' "
                             "(it becomes a constraint key)")
        if metric != "accuracy" and metric in OBJECTIVES and not isinstance(OBJECTIVES.get(metric).read, TaskValue):
            raise ValueError(f"{name}: task metric {metric!r} has the name of a built-in cost objective: rename it")
        if direction not in (MAXIMIZE, MINIMIZE):
            raise ValueError(f"{name}: direction of {metric!r} must be 'maximize' or 'minimize', got {direction!r}")
    return dict(value)


def declare_metrics(**directions: str) -> Callable[[Callable], Callable]:
    """Decorator for a task plugin's factory: the metric names (and directions) its Task
    scores by, readable without building the task (``declared_metrics``)."""
    checked = check_metric_directions("declare_metrics", directions)

    def wrap(fn: Callable) -> Callable:
        fn.metric_directions = checked
        return fn

    return wrap


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of ``exc`` on one line (error messages must be one line)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- registry -------------------------------------------------------------------------------
TaskBuilder = Callable[[dict, Path], Task]
# The built-in tasks register themselves on import: plugins, loaded on the first lookup.
TASKS: Registry[TaskBuilder] = Registry(
    "task", plugins=("evaluators.digits", "evaluators.image_folder", "evaluators.synthetic", "evaluators.tokens",
                     "evaluators.regression", "evaluators.language")
)


def register_task(name: str, metrics: Mapping[str, str] | None = None) -> Callable[[TaskBuilder], TaskBuilder]:
    """Decorator for a built-in task: ``fn(options: dict, cache_dir: Path) -> Task``;
    ``metrics`` declares its metric directions when they are not top-1 accuracy."""
    def wrap(fn: TaskBuilder) -> TaskBuilder:
        if metrics is not None:
            declare_metrics(**metrics)(fn)
        return TASKS.register(name)(fn)

    return wrap


def declared_metrics(spec: str) -> dict[str, str]:
    """The metric directions task ``spec`` declares, read without building it (a plugin's
    module is imported); top-1 accuracy when it declares none. ``ValueError`` (one line) for
    an unknown or broken spec."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"task must be a registered name or 'package.module:callable', got {spec!r}")
    if spec in TASKS:
        factory = TASKS.get(spec)
    elif ":" in spec:
        _working_directory_importable()
        factory = import_object(spec, "task plugin")
    else:
        raise ValueError(
            f"unknown task {spec!r} (built-in: {', '.join(available_tasks())}; or a plugin 'package.module:callable')"
        )
    declared = getattr(factory, "metric_directions", None)
    if declared is None:
        return dict(DEFAULT_METRICS)
    return check_metric_directions(f"task {spec!r}: metric_directions", declared)


def available_tasks() -> tuple[str, ...]:
    return TASKS.names()


def import_object(spec: str, what: str = "plugin") -> Any:
    """Resolve ``"package.module:attr[.attr]"``; every failure is one ``ValueError`` line."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r} is not of the form 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or any error raised while importing the module
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r}: {one_line(exc)}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"{what} {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def check_options(fn: Callable, spec: str, options: Mapping[str, Any], what: str) -> None:
    """``ValueError`` when ``fn`` cannot be called with ``**options`` (checked before calling)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    try:
        signature.bind(**options)
    except TypeError as exc:
        raise ValueError(f"{what} {spec!r} does not accept options {sorted(options)}: {exc}") from None


def load_task(spec: str, options: Mapping | None = None, cache_dir: str | Path = "studies/cache") -> Task:
    """The task named ``spec`` (a registered name or ``"package.module:callable"``).

    Built-in tasks train their base model here on first use and cache the weights under
    ``cache_dir``. Bad input (unknown name, broken plugin, bad options) raises ``ValueError``.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"task must be a registered name or 'package.module:callable', got {spec!r}")
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"task options must be a mapping, got {type(options).__name__}")
    options = dict(options or {})
    task_spec = TaskSpec(spec, copy.deepcopy(options), str(cache_dir), os.getcwd())
    task = _build_task(spec, options, cache_dir)
    declared = declared_metrics(spec)
    if dict(task.metric_directions) != declared:
        raise ValueError(f"task {spec!r} scores by {dict(task.metric_directions)} but declares {declared}: declare "
                         "the Task's metric_directions on its factory (@declare_metrics)")
    task.spec = task_spec
    return task


def _build_task(spec: str, options: dict, cache_dir: str | Path) -> Task:
    if spec in TASKS:
        return TASKS.get(spec)(options, Path(cache_dir))
    if ":" not in spec:
        raise ValueError(
            f"unknown task {spec!r} (built-in: {', '.join(available_tasks())}; or a plugin 'package.module:callable')"
        )
    _working_directory_importable()
    factory = import_object(spec, "task plugin")
    if _takes_cache_dir(factory):  # an explicit [task.options] cache_dir (older configs) wins
        options.setdefault("cache_dir", Path(cache_dir))
    check_options(factory, spec, options, "task plugin")
    task = factory(**options)
    if not isinstance(task, Task):
        raise ValueError(f"task plugin {spec!r} returned {type(task).__name__}, not an evaluators.tasks.Task")
    return task


def _working_directory_importable() -> None:
    """Put the working directory at the end of ``sys.path`` (where ``python -m`` would put
    it first): a plugin module beside the study imports, and cannot shadow an installed one."""
    cwd = os.getcwd()
    if not any(entry in ("", ".", cwd) for entry in sys.path):
        sys.path.append(cwd)


def _takes_cache_dir(fn: Callable) -> bool:
    """Whether plugin ``fn`` declares a ``cache_dir`` parameter (not merely ``**kwargs``)."""
    try:
        parameter = inspect.signature(fn).parameters.get("cache_dir")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                        inspect.Parameter.KEYWORD_ONLY)
