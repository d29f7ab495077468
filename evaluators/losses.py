"""Training losses shared by the evaluators' fine-tune and the masking searcher."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): KL(teacher_T || student_T) * T^2.

    ``student`` and ``teacher`` are (batch, classes) logits; the T^2 factor keeps the
    gradient scale independent of the temperature.
    """
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean") * t * t
