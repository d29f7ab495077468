"""Recovery registry, adaptive BN (EagleEye) and fine-tuning with distillation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from evaluators.build import calibration_batches
from evaluators.evaluate import validation_batches
from evaluators.measure import top1_accuracy
from evaluators.prune import apply_policy
from evaluators.recover import available_recoveries, recalibrate_bn, recover, register_recovery
from evaluators.settings import EvalSettings
from evaluators.tasks import load_task
from spaces.space import SearchSpace

CACHE = Path(__file__).resolve().parents[1] / "studies" / "cache"


@pytest.fixture(scope="module")
def digits():
    task = load_task("digits", cache_dir=CACHE)
    base = task.base_model()
    space = SearchSpace.from_model(base, task.example_inputs, ratio_min=0.1)
    return task, base, space


def _pruned_half(digits, settings):
    task, base, space = digits
    calibration = calibration_batches(task, settings)
    pruned = apply_policy(base, space.uniform(0.5), task.example_inputs, calibration, groups=space.groups)
    return pruned, calibration


def _recovered_accuracy(digits, name, settings=EvalSettings()):
    task, base, _ = digits
    pruned, calibration = _pruned_half(digits, settings)
    model = recover(name, pruned, base=base, task=task, settings=settings, calibration=calibration)
    assert not model.training
    return top1_accuracy(model, validation_batches(task, settings))


def test_builtin_recoveries_registered():
    assert {"none", "adaptive_bn", "finetune"} <= set(available_recoveries())


def test_unknown_recovery_is_value_error(digits):
    task, base, _ = digits
    with pytest.raises(ValueError, match="unknown recovery 'magic'"):
        recover("magic", base, base=base, task=task, settings=EvalSettings(), calibration=[])


def test_registered_recovery_is_called_with_the_contract_arguments(digits):
    task, base, _ = digits
    seen = {}

    @register_recovery("test-recorder")
    def recorder(pruned, *, base, task, settings, calibration):
        seen.update(base=base, task=task, settings=settings, calibration=calibration)
        return pruned.train()

    settings = EvalSettings(recovery="test-recorder")  # validated against the registry
    batches = task.batches("calibration", 8, limit=16)
    out = recover("test-recorder", base, base=base, task=task, settings=settings, calibration=batches)
    assert out is base and not out.training  # recover always hands back eval mode
    assert seen["task"] is task and seen["settings"] is settings and len(seen["calibration"]) == 2

    @register_recovery("test-broken")
    def broken(pruned, **kwargs):
        return None

    with pytest.raises(ValueError, match="recovery 'test-broken' returned NoneType"):
        recover("test-broken", base, base=base, task=task, settings=settings, calibration=batches)


def test_recalibrate_bn_sets_exact_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU()).eval()
    model[1].running_mean.fill_(7.0)
    batches = [(torch.randn(5, 3, 6, 6) * 2 + 1, torch.zeros(5)) for _ in range(3)]
    recalibrate_bn(model, batches)
    with torch.no_grad():
        feats = torch.cat([model[0](x) for x, _ in batches])
    expected_mean = feats.mean((0, 2, 3))
    assert torch.allclose(model[1].running_mean, expected_mean, atol=1e-5)
    assert model[1].momentum == 0.1  # restored after the pass
    assert not model.training and not model[2].training


def test_adaptive_bn_beats_no_recovery_at_half_width(digits):
    none = _recovered_accuracy(digits, "none")
    adaptive = _recovered_accuracy(digits, "adaptive_bn")
    assert adaptive > none + 0.05, (none, adaptive)


def test_adaptive_bn_without_calibration_is_value_error(digits):
    task, base, _ = digits
    pruned, _ = _pruned_half(digits, EvalSettings())
    with pytest.raises(ValueError, match="needs calibration batches"):
        recover("adaptive_bn", pruned, base=base, task=task, settings=EvalSettings(), calibration=[])


def test_finetune_improves_on_adaptive_bn_and_is_deterministic(digits):
    settings = EvalSettings(recovery="finetune", finetune_steps=10, finetune_lr=0.02, batch_size=32)
    adaptive = _recovered_accuracy(digits, "adaptive_bn", settings)
    tuned = _recovered_accuracy(digits, "finetune", settings)
    again = _recovered_accuracy(digits, "finetune", settings)
    assert tuned > adaptive, (adaptive, tuned)
    assert tuned == again
    no_kd = _recovered_accuracy(digits, "finetune", settings.replace(kd=False))
    assert no_kd > adaptive, (adaptive, no_kd)


def test_finetune_with_zero_steps_is_adaptive_bn(digits):
    settings = EvalSettings(recovery="finetune", finetune_steps=0)
    assert _recovered_accuracy(digits, "finetune", settings) == _recovered_accuracy(digits, "adaptive_bn", settings)


def test_finetune_leaves_the_teacher_untouched(digits):
    task, base, _ = digits
    before = {k: v.clone() for k, v in base.state_dict().items()}
    settings = EvalSettings(recovery="finetune", finetune_steps=3)
    pruned, calibration = _pruned_half(digits, settings)
    recover("finetune", pruned, base=base, task=task, settings=settings, calibration=calibration)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
