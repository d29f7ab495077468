"""Measurements: top-1 accuracy and FLOPs/params of real pruned models."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from evaluators.measure import model_cost, top1_accuracy
from evaluators.prune import apply_policy
from spaces.space import SearchSpace
from tests.architectures import ARCHITECTURES


class FixedLogits(nn.Module):
    """Predicts class ``x[:, 0]`` (as an integer): accuracy is known in advance."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0].long(), self.classes).float()


def test_top1_accuracy_counts_exactly():
    model = FixedLogits()
    preds = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    labels = torch.tensor([0, 1, 2, 0, 1, 1, 2])  # 5 of 7 right
    batches = [(preds[:4, None].float(), labels[:4]), (preds[4:, None].float(), labels[4:])]
    assert top1_accuracy(model, batches) == pytest.approx(5 / 7)


def test_top1_accuracy_bad_input():
    with pytest.raises(ValueError, match="at least one batch"):
        top1_accuracy(FixedLogits(), [])
    with pytest.raises(ValueError, match="not \\(batch, classes\\) logits"):
        top1_accuracy(nn.Identity(), [(torch.zeros(3), torch.zeros(3, dtype=torch.long))])


@pytest.mark.parametrize("arch", ["resnet", "mobilenetv2", "plain_cnn"])
def test_measured_cost_of_pruned_model_matches_the_cost_model(arch):
    cls, make_input = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model, x = cls().eval(), make_input()
    space = SearchSpace.from_model(model, x, ratio_min=0.1)
    for ratio in (1.0, 0.6, 0.3):
        policy = space.uniform(ratio)
        pruned = apply_policy(model, policy, x, groups=space.groups)
        measured, predicted = model_cost(pruned, x), space.predict_cost(policy)
        assert measured.flops == pytest.approx(predicted.flops, rel=1e-2)
        assert measured.params == pytest.approx(predicted.params, rel=1e-2)
        assert measured.params == sum(p.numel() for p in pruned.parameters())
    assert model_cost(model, x).flops > model_cost(apply_policy(model, space.uniform(0.5), x, groups=space.groups), x).flops


def test_model_cost_keeps_training_mode():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train()
    model_cost(model, torch.randn(1, 1, 5, 5))
    assert model.training
