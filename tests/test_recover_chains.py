"""cap_finetune: the fine-tune starts from CaP's compensated weights."""

from __future__ import annotations

import torch

from evaluators.build import calibration_batches, seeded
from evaluators.prune import apply_policy
from evaluators.recover import available_recoveries, recover
from evaluators.settings import EvalSettings
from evaluators.tasks import load_task
from spaces.space import SearchSpace

OPTIONS = {"n_samples": 160, "epochs": 1, "dim": 16, "heads": 2, "head_dim": 4, "hidden": 16, "depth": 1}


def _recovered(task, base, space, name, settings):
    pruned = apply_policy(base, space.uniform(0.5), task.example_inputs, groups=space.groups)
    with seeded(settings):
        model = recover(name, pruned, base=base, task=task, settings=settings,
                        calibration=calibration_batches(task, settings))
    x = task.validation[0][:16]
    with torch.no_grad():
        return model(x)


def test_cap_finetune_is_registered_and_starts_from_the_compensated_weights(tmp_path):
    assert "cap_finetune" in available_recoveries()
    task = load_task("tokens", OPTIONS, cache_dir=tmp_path)
    base = task.base_model()
    space = SearchSpace.from_model(base, task.example_inputs, ratio_min=0.5)
    settings = EvalSettings(calibration_samples=32, bn_batches=2, finetune_steps=0)
    # no BatchNorm: with no steps the chain is CaP compensation exactly
    assert torch.equal(_recovered(task, base, space, "cap_finetune", settings),
                       _recovered(task, base, space, "cap_nobn", settings))
    tuned = settings.replace(finetune_steps=3, finetune_lr=0.003)
    out = _recovered(task, base, space, "cap_finetune", tuned)
    assert not torch.equal(out, _recovered(task, base, space, "cap_nobn", settings))
    assert torch.equal(out, _recovered(task, base, space, "cap_finetune", tuned))   # deterministic
    assert not torch.equal(out, _recovered(task, base, space, "finetune", tuned))   # not from the raw pruned weights
