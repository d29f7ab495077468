"""What the built-in tasks share: option merging, seeded splits, deterministic training and
a weight cache safe for several processes, assembled into a trained :class:`Task`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from evaluators.batch import Batch, Inputs, call, take
from evaluators.datasets import Split, read_batches, read_samples, split_length
from evaluators.losses import cross_entropy
from evaluators.measure import task_values
from evaluators.tasks import Task
from spaces.checks import check_int, check_number_list

log = logging.getLogger(__name__)

Tensor = torch.Tensor
Augment = Callable[[Tensor, torch.Generator], Tensor]
EVAL_BATCH = 256


def task_options(task: str, options: Mapping, defaults: Mapping) -> dict:
    """``options`` over ``defaults``; ``ValueError`` naming any option ``defaults`` lacks."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) for task {task!r}: {', '.join(unknown)} (known: {', '.join(sorted(defaults))})")
    return {**defaults, **options}


def option_error(task: str, key: str, wanted: str, value: object) -> ValueError:
    return ValueError(f"{task} option {key} must be {wanted}, got {value!r}")


def check_option(task: str, key: str, value: Any, check: Callable[..., Any], *args: Any, wanted: str) -> Any:
    """``check(key, value, *args)`` (a ``spaces.checks`` helper) with the task's wording."""
    try:
        return check(key, value, *args)
    except ValueError:
        raise option_error(task, key, wanted, value) from None


def check_widths(task: str, widths: Any) -> list[int]:
    """Three stage widths, each an integer >= 2."""
    if not isinstance(widths, (list, tuple)) or len(widths) != 3:
        raise option_error(task, "widths", "3 integers >= 2", widths)
    return [check_option(task, "widths", w, check_int, 2, wanted="3 integers >= 2") for w in widths]


def check_split(task: str, split: Any) -> list[float]:
    """Train/calibration/validation fractions: three numbers > 0 summing to 1."""
    wanted = "3 positive fractions summing to 1"
    fractions = check_option(task, "split", split, check_number_list, wanted=wanted)
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) >= 1e-6:
        raise option_error(task, "split", wanted, split)
    return list(fractions)


def config_hash(config: Mapping) -> str:
    """Short stable hash of a JSON-able config (names cache files)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def seeded_split(n: int, fractions: tuple[float, float, float], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Indices of a seeded random train/calibration/validation split of ``n`` samples."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(fractions[0] * n))
    n_cal = int(round(fractions[1] * n))
    n_train = max(1, min(n_train, n - 2))
    n_cal = max(1, min(n_cal, n - n_train - 1))
    return perm[:n_train], perm[n_train : n_train + n_cal], perm[n_train + n_cal :]


def split_data(x: Inputs, y: Tensor, fractions: tuple[float, float, float], seed: int) -> tuple[Batch, Batch, Batch]:
    """(train, calibration, validation) pairs of a seeded random split of ``(x, y)``."""
    return tuple((take(x, idx), y[idx]) for idx in seeded_split(len(y), fractions, seed))  # type: ignore[return-value]


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
}


def train_classifier(
    model: nn.Module,
    data: Split,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
    threads: int = 1,
    augment: Augment | None = None,
    desc: str = "training",
    optimizer: str = "sgd",
    loss: Callable[[Any, Tensor], Tensor] = cross_entropy,
) -> dict[str, Tensor]:
    """Deterministic one-cycle training with ``optimizer`` (a name in ``OPTIMIZERS``: SGD
    with Nesterov momentum for the CNNs, AdamW for transformers) on ``loss`` (cross-entropy
    unless the task has its own); returns the state_dict."""
    from tqdm.auto import tqdm

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # fixed threads: same weights on every machine
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        n = split_length(data)  # a pair (x, y) or a dataset, read a batch at a time
        steps_per_epoch = math.ceil(n / batch_size)
        optimizer = OPTIMIZERS[optimizer](model.parameters(), lr)
        total = epochs * steps_per_epoch
        # OneCycleLR needs >= 2 warm-up steps (pct_start x total): fewer, and it divides by
        # zero; so little training (a few batches) runs at the constant lr instead
        schedule = (torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=0.2)
                    if 0.2 * total >= 2 else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))
        model.train()
        for _ in tqdm(range(epochs), desc=desc, leave=False, disable=None):
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                x, y = read_samples(data, order[i : i + batch_size])
                if augment is not None:
                    x = augment(x, gen)
                value = loss(call(model, x), y)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(previous)


def _save_atomic(state: Mapping[str, Tensor], path: Path) -> None:
    # Several processes (pytest workers, launchers) may train the same task at once:
    # write to a temporary file and rename so nobody ever loads a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(dict(state), tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_weights(path: Path, train: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Weights from ``path`` (``weights_only=True``), training and saving them when missing."""
    if path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt cache file is rebuilt, not fatal
            log.warning("cached weights %s unreadable (%s); retraining", path, exc)
    start = time.perf_counter()
    state = train()
    log.info("trained base model in %.1f s -> %s", time.perf_counter() - start, path)
    _save_atomic(state, path)
    return state


def trained_task(name: str, x: Tensor, y: Tensor, *, opts: Mapping, **rest: Any) -> Task:
    """A :class:`Task` over ``(x, y)`` split by ``opts["split"]`` and ``opts["seed"]``;
    ``rest`` are ``trained_splits_task``'s other keywords."""
    # a copy of the first sample: a view would carry the whole of x's storage when pickled
    return trained_splits_task(name, split_data(x, y, tuple(opts["split"]), opts["seed"]), take(x, torch.arange(1)),
                               opts=opts, **rest)


def trained_splits_task(
    name: str,
    splits: tuple[Split, Split, Split],
    example: Inputs,
    *,
    build: Callable[[], nn.Module],
    num_classes: int,
    opts: Mapping,
    config: dict,
    cache_dir: Path,
    augment: Augment | None = None,
    state: Mapping[str, Tensor] | None = None,
    **scoring: Any,
) -> Task:
    """A :class:`Task` over the (train, calibration, validation) ``splits`` (pairs or datasets).

    Without ``state`` the base model is trained with ``opts`` (epochs, batch_size, lr,
    seed) on the train split once and cached under ``cache_dir``, named by ``config``.
    ``scoring`` holds the task's own ``metrics``, ``metric_directions``, ``loss`` and
    ``distill`` (Task fields); the base model trains on that ``loss``.
    """
    train, calibration, validation = splits

    def fit() -> dict[str, Tensor]:
        torch.manual_seed(opts["seed"])
        model = build()
        trained = train_classifier(
            model, train, epochs=opts["epochs"], batch_size=opts["batch_size"], lr=opts["lr"],
            optimizer=opts.get("optimizer", "sgd"), loss=scoring.get("loss") or cross_entropy,
            seed=opts["seed"], augment=augment, desc=f"training {name} base model",
        )
        log.info("%s base model: validation %s", name,
                 task_values(model, probe, read_batches(validation, EVAL_BATCH, seed=None)))
        return trained

    probe = Task(name=name, build_model=build, train=train, calibration=calibration, validation=validation,
                 example_inputs=example, num_classes=num_classes, base_state={}, config=config, **scoring)
    if state is None:
        state = cached_weights(cache_dir / f"{name}-{config_hash(config)}.pt", fit)
    probe.base_state = dict(state)
    return probe
