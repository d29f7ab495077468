"""Measurements of a (pruned) model: the task's metrics (top-1 accuracy by default) and
FLOPs/params (timing: ``evaluators.timing``)."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from evaluators.batch import Batch, call
from evaluators.devices import model_device, to_device
from spaces.cost import Cost, count_cost

if TYPE_CHECKING:
    from evaluators.tasks import Task


def top1_accuracy(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Fraction of samples whose arg-max logit is the label (model put in eval mode), each
    batch moved to the model's device."""
    if not batches:
        raise ValueError("accuracy needs at least one batch; none were given")
    model.eval()
    device = model_device(model)
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            x, y = to_device(x, device), to_device(y, device)
            out = call(model, x)
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(y):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"model output {shape} is not (batch, classes) logits for a batch of {len(y)}")
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    return correct / total


def task_values(model: nn.Module, task: "Task", batches: Sequence[Batch]) -> dict[str, float]:
    """``task``'s metrics of ``model`` on ``batches`` (model in eval mode, batches moved to its
    device): ``task.metrics`` when it gives one, else ``{"accuracy": top1_accuracy}``.
    ``ValueError`` (one line) when they are not exactly the declared names with numbers."""
    if task.metrics is None:
        return {"accuracy": top1_accuracy(model, batches)}
    if not batches:
        raise ValueError("metrics need at least one batch; none were given")
    model.eval()
    moved = to_device(list(batches), model_device(model))
    with torch.no_grad():
        values = task.metrics(model, moved)
    if not isinstance(values, Mapping) or set(values) != set(task.metric_directions):
        got = sorted(values) if isinstance(values, Mapping) else type(values).__name__
        raise ValueError(f"task {task.name!r} metrics returned {got}, not {sorted(task.metric_directions)}")
    out = {}
    for name, value in values.items():
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
        if not math.isfinite(value):
            raise ValueError(f"task {task.name!r} metric {name!r} is {value}")
        out[name] = value
    return out


def model_cost(model: nn.Module, example_inputs: Any) -> Cost:
    """FLOPs (MACs per sample) and params counted on the real model.

    ``spaces.cost.count_cost`` is the counter the analytic cost model reproduces exactly,
    so measured and predicted costs are directly comparable. Counted where ``model`` is
    (``example_inputs`` are moved to its device); the counts do not depend on the device.
    """
    was_training = model.training
    model.eval()
    # Torch-Pruning's counter prints "No positional inputs found ... assuming batch size is 1"
    # for every module of a model called with keyword inputs: true (one sample), and noise.
    keyword_inputs = isinstance(example_inputs, Mapping)
    quiet = contextlib.redirect_stdout(io.StringIO()) if keyword_inputs else contextlib.nullcontext()
    try:
        with torch.no_grad(), quiet:
            return count_cost(model, to_device(example_inputs, model_device(model)))
    finally:
        model.train(was_training)
