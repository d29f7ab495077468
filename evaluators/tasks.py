"""Tasks: a model factory, its trained weights and the data an evaluation needs.

Built-ins (``available_tasks()``), each in its own module and registered with
``@register_task``: ``digits`` (:mod:`evaluators.digits`), ``image-folder``
(:mod:`evaluators.image_folder`), ``shapes`` (:mod:`evaluators.synthetic`) and ``tokens``
(:mod:`evaluators.tokens`, a small transformer).

Any other spec of the form ``"package.module:callable"`` is a plugin: ``callable(**options)``
must return a :class:`Task`. A plugin that declares a ``cache_dir`` parameter also gets the
study's ``[task] cache_dir`` (a ``Path``) there, as the built-ins do, unless its options
already name one. Plugin modules are imported from ``sys.path`` and then from the working
directory, so ``mymod.py`` beside the study needs no ``PYTHONPATH=.`` (Ray workers get the
driver's working directory on their path as well).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from evaluators.batch import Batch
from spaces.checks import check_int
from spaces.registry import Registry

Tensor = torch.Tensor
SPLITS = ("train", "calibration", "validation")


@dataclass
class Task:
    """A model architecture, its trained weights and the data to evaluate pruned copies on."""

    name: str
    build_model: Callable[[], nn.Module]      # the architecture, picklable (module-level fn / functools.partial)
    train: tuple[Tensor, Tensor]              # (x, y) CPU tensors
    calibration: tuple[Tensor, Tensor]        # small subset used by adaptive BN / importance / CaP
    validation: tuple[Tensor, Tensor]         # proxy accuracy is measured here
    example_inputs: Tensor                    # ONE sample (batch 1): costs are per sample
    num_classes: int
    base_state: dict[str, Tensor]             # trained weights of build_model()
    config: dict = field(default_factory=dict)  # what the task was built from (hashing / display)

    def __post_init__(self) -> None:
        if not callable(self.build_model):
            raise ValueError(f"task {self.name!r}: build_model must be callable, got {type(self.build_model).__name__}")
        for split in SPLITS:
            pair = getattr(self, split)
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
                raise ValueError(f"task {self.name!r}: {split} must be a tuple (x, y) of tensors")
            x, y = pair
            if len(x) != len(y):
                raise ValueError(f"task {self.name!r}: {split} has {len(x)} inputs but {len(y)} labels")
            if len(x) == 0:
                raise ValueError(f"task {self.name!r}: {split} split is empty")
        if not isinstance(self.example_inputs, Tensor) or self.example_inputs.shape[:1] != (1,):
            raise ValueError(f"task {self.name!r}: example_inputs must be a tensor holding one sample (batch 1)")
        check_int(f"task {self.name!r}: num_classes", self.num_classes, 1)
        if not isinstance(self.base_state, Mapping):
            raise ValueError(f"task {self.name!r}: base_state must be a state_dict, got {type(self.base_state).__name__}")

    def base_model(self) -> nn.Module:
        """A fresh ``build_model()`` loaded with ``base_state``, in eval mode."""
        model = self.build_model()
        model.load_state_dict(self.base_state)
        return model.eval()

    def split(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
        return getattr(self, split)

    def batches(
        self, split: str, batch_size: int, limit: int | None = None, seed: int | None = 0
    ) -> list[Batch]:
        """``split`` cut into batches of ``batch_size``.

        Samples are shuffled by ``seed`` (``None`` keeps the stored order); ``limit`` caps
        the number of *samples* (not batches) taken after shuffling.
        """
        check_int("batch_size", batch_size, 1)
        if limit is not None:
            try:
                check_int("limit", limit, 1)
            except ValueError:
                raise ValueError(f"limit must be None or an integer >= 1, got {limit!r}") from None
        x, y = self.split(split)
        n = len(y) if limit is None else min(limit, len(y))
        if seed is None:
            idx = torch.arange(n)
        else:
            idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
        return [(x[idx[i : i + batch_size]], y[idx[i : i + batch_size]]) for i in range(0, n, batch_size)]


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of ``exc`` on one line (error messages must be one line)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- registry -------------------------------------------------------------------------------
TaskBuilder = Callable[[dict, Path], Task]
# The built-in tasks register themselves on import: plugins, loaded on the first lookup.
TASKS: Registry[TaskBuilder] = Registry(
    "task", plugins=("evaluators.digits", "evaluators.image_folder", "evaluators.synthetic", "evaluators.tokens")
)


def register_task(name: str) -> Callable[[TaskBuilder], TaskBuilder]:
    """Decorator for a built-in task: ``fn(options: dict, cache_dir: Path) -> Task``."""
    return TASKS.register(name)


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
