"""kd_loss: the distillation loss of the fine-tune and the masking searcher."""

import pytest
import torch

from evaluators.losses import kd_loss


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(8, 5)
    assert kd_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(torch.randn(8, 5), logits, 4.0).item() > 0


def test_kd_loss_keeps_its_gradient_scale_across_temperatures():
    torch.manual_seed(1)
    teacher = torch.randn(16, 10)
    grads = []
    for t in (2.0, 8.0):
        student = torch.randn(16, 10, generator=torch.Generator().manual_seed(2), requires_grad=True)
        kd_loss(student, teacher, t).backward()
        grads.append(student.grad.norm().item())
    assert 0.1 < grads[0] / grads[1] < 10  # the T^2 factor: same order of magnitude
