"""Training losses shared by the evaluators' fine-tune, the gradient-based criteria and the
masking searcher, and the task's own ones (``Task.loss``/``Task.distill``) where it gives them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from evaluators.tasks import Task


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): KL(teacher_T || student_T) * T^2.

    ``student`` and ``teacher`` are logits over their last axis: (batch, classes), or e.g.
    (batch, tokens, vocabulary), averaged over every other position; the T^2 factor keeps
    the gradient scale independent of the temperature.
    """
    t = temperature
    s, q = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    return F.kl_div(F.log_softmax(s / t, dim=1), F.softmax(q / t, dim=1), reduction="batchmean") * t * t


def cross_entropy(output: Any, target: torch.Tensor) -> torch.Tensor:
    """The default task loss: cross-entropy of (batch, classes) logits against labels."""
    return F.cross_entropy(output, target)


def task_loss(task: "Task") -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """``task``'s training loss: its own ``loss``, else cross-entropy."""
    return task.loss if task.loss is not None else cross_entropy


def task_distill(task: "Task") -> Callable[[Any, Any, float], torch.Tensor]:
    """``task``'s distillation loss (student, teacher, temperature): its own, else ``kd_loss``."""
    return task.distill if task.distill is not None else kd_loss
