"""Measurements of a (pruned) model: top-1 accuracy and FLOPs/params (timing: ``evaluators.timing``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from evaluators.batch import Batch
from evaluators.devices import model_device, to_device
from spaces.cost import Cost, count_cost


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
            out = model(x)
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(y):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"model output {shape} is not (batch, classes) logits for a batch of {len(y)}")
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    return correct / total


def model_cost(model: nn.Module, example_inputs: Any) -> Cost:
    """FLOPs (MACs per sample) and params counted on the real model.

    ``spaces.cost.count_cost`` is the counter the analytic cost model reproduces exactly,
    so measured and predicted costs are directly comparable. Counted where ``model`` is
    (``example_inputs`` are moved to its device); the counts do not depend on the device.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return count_cost(model, to_device(example_inputs, model_device(model)))
    finally:
        model.train(was_training)
