"""Task plugins with their own metrics, for the tests (``tests.metric_tasks:...``).

``regression_task`` is a cheap, untrained MLP regressor scored by ``mae`` (minimised) with
an L1 loss, taking its inputs as a tuple ``(x, scale)``; the others are broken on purpose
(a declaration the Task contradicts, a bad declaration, a metric named like a cost).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluators.batch import call
from evaluators.tasks import Task, declare_metrics


class TwoInputMLP(nn.Module):
    """``model(x, scale)``: an MLP of ``x`` times a per-sample scale (two positional inputs)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1) * scale


def _build(hidden: int = 16) -> nn.Module:
    return TwoInputMLP(hidden)


def mae(model: nn.Module, batches: Sequence[Any]) -> dict[str, float]:
    errors = [(call(model, x) - y).abs() for x, y in batches]
    return {"mae": float(torch.cat(errors).mean())}


def l1_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(output, target)


def _task(seed: int, samples: int, **scoring: Any) -> Task:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _build()
    x = torch.randn(3 * samples, 4, generator=gen)
    scale = torch.rand(3 * samples, generator=gen) + 0.5
    y = torch.sin(x).sum(1) * scale

    def split(i: int) -> tuple:
        part = slice(i * samples, (i + 1) * samples)
        return (x[part], scale[part]), y[part]

    return Task(name="regression", build_model=functools.partial(_build, 16), train=split(0), calibration=split(1),
                validation=split(2), example_inputs=(x[:1].clone(), scale[:1].clone()), num_classes=1,
                base_state={k: v.clone() for k, v in model.state_dict().items()}, config={"seed": seed},
                **scoring)


@declare_metrics(mae="minimize")
def regression_task(seed: int = 0, samples: int = 48) -> Task:
    return _task(seed, samples, metrics=mae, metric_directions={"mae": "minimize"}, loss=l1_loss)


@declare_metrics(mae="minimize")
def undeclared_accuracy_task(seed: int = 0) -> Task:
    """Declares ``mae`` but its Task scores by top-1 accuracy (the default)."""
    return _task(seed, 48)


def badly_declared_task(seed: int = 0) -> Task:
    return _task(seed, 48, metrics=mae, metric_directions={"mae": "minimize"}, loss=l1_loss)


badly_declared_task.metric_directions = {"MAE": "minimize"}  # type: ignore[attr-defined]


def flops_named_metric(model: nn.Module, batches: Sequence[Any]) -> dict[str, float]:
    return {"flops": mae(model, batches)["mae"]}


def cost_named_task(seed: int = 0) -> Task:
    return _task(seed, 48, metrics=flops_named_metric, metric_directions={"flops": "minimize"}, loss=l1_loss)


cost_named_task.metric_directions = {"flops": "minimize"}  # type: ignore[attr-defined]  (declare_metrics refuses it)
