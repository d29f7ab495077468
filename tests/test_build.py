"""build_pruned: the one way a pruned + recovered model is built (workers, evaluate, export)."""

from __future__ import annotations

import pytest
import torch

from evaluators.build import build_pruned, seeded
from evaluators.evaluate import evaluate, evaluate_model
from evaluators.settings import EvalSettings
from spaces.policy import Policy
from tests.fakes import FAST_EVAL as FAST


@pytest.fixture(scope="module")
def digits(digits_l1_taylor):
    return digits_l1_taylor


@pytest.mark.parametrize("method", ["l1", "taylor"])
def test_the_built_model_measures_what_evaluate_recorded(digits, method):
    task, base, space = digits
    policy = Policy(ratios=dict(space.uniform(0.5).ratios), method=method)
    recorded = evaluate(policy, task, FAST, groups=space.groups, base_model=base)
    timings: dict[str, float] = {}
    model = build_pruned(policy, task, FAST, groups=space.groups, base=base, timings=timings)
    assert not model.training and set(timings) == {"prune", "recover"}
    again = evaluate_model(model, task, FAST)
    assert again.accuracy == recorded.accuracy and again.flops == recorded.flops
    # without a base model given, the task's is built: the same model
    assert evaluate_model(build_pruned(policy, task, FAST, groups=space.groups), task, FAST).accuracy == again.accuracy


def test_build_leaves_the_base_model_and_the_callers_random_stream_alone(digits):
    task, base, space = digits
    before = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_pruned(space.uniform(0.4), task, FAST, groups=space.groups, base=base)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_seeded_fixes_threads_and_seed_for_the_block():
    settings = EvalSettings(seed=7, threads=1)
    with seeded(settings):
        first = torch.rand(2)
        assert torch.get_num_threads() == 1
    with seeded(settings):
        assert torch.equal(torch.rand(2), first)
