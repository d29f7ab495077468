"""CaP compensation: exact on redundant channels, better than adaptive BN on digits, clear errors."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import evaluators.compensation as compensation
from search.params import distributions
from evaluators.compensation import CaPConfig, compensate
from evaluators.build import calibration_batches
from evaluators.evaluate import evaluate
from evaluators.prune import apply_policy
from evaluators.recover import available_recoveries, recover
from evaluators.settings import EvalSettings
from evaluators.tasks import load_task
from spaces.groups import build_graph, discover_groups, root_pruning_group
from spaces.policy import Policy
from search.config import check_space_names
from spaces.space import RECOVERY_PARAM, SearchSpace, SpaceConfig
from tests.architectures import ARCHITECTURES

CACHE = Path(__file__).resolve().parents[1] / "studies" / "cache"


@pytest.fixture(scope="module")
def digits():
    task = load_task("digits", cache_dir=CACHE)
    base = task.base_model()
    space = SearchSpace.from_model(base, task.example_inputs, ratio_min=0.1, recoveries=("adaptive_bn", "cap"))
    settings = EvalSettings()
    calibration = calibration_batches(task, settings)
    pruned = apply_policy(base, space.uniform(0.5), task.example_inputs, calibration, groups=space.groups)
    return task, base, space, settings, calibration, pruned


def _remove(model: nn.Module, example: torch.Tensor, name: str, idxs: list[int]) -> None:
    root_pruning_group(build_graph(model, example), dict(model.named_modules())[name], idxs).prune()


def _output_of(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    out = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: out.setdefault("y", o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return out["y"]


# -- exactness where the removed channels are redundant ---------------------------------------------
class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)  # stride + padding: im2col must match
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.head(x.mean((2, 3)))


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("cls, producer, consumer, shape", [
    (_ConvNet, "conv1", "conv2", (3, 12, 12)), (_MLP, "fc1", "fc2", (10,)),
])
def test_removed_duplicate_channels_are_compensated_exactly(cls, producer, consumer, shape):
    """Channels 5 and 6 duplicate 1 and 2: least squares folds them into the kept copies,
    so the consumer's output equals the unpruned one; without compensation it does not."""
    torch.manual_seed(0)
    base = cls().eval()
    with torch.no_grad():
        layer = getattr(base, producer)
        layer.weight[5], layer.bias[5] = layer.weight[1], layer.bias[1]
        layer.weight[6], layer.bias[6] = layer.weight[2], layer.bias[2]
    example = torch.randn(1, *shape)
    calibration = [(torch.randn(32, *shape), torch.zeros(32, dtype=torch.long)) for _ in range(2)]
    pruned = copy.deepcopy(base)
    _remove(pruned, example, producer, [5, 6])
    x = torch.randn(16, *shape)
    target = _output_of(base, consumer, x)
    before = (_output_of(pruned, consumer, x) - target).abs().max()
    report = compensate(pruned, base, calibration, CaPConfig(ridge=0.0))
    after = (_output_of(pruned, consumer, x) - target).abs().max()
    assert report.compensated == [consumer]
    assert before > 0.05
    assert after < 1e-3
    entry = report.layers[0]
    assert entry.error_after < 1e-6 < entry.error_before


# -- digits ------------------------------------------------------------------------------------------
def test_cap_beats_adaptive_bn_at_half_width(digits, record_property):
    task, base, space, settings, _, _ = digits
    policy = space.uniform(0.5)
    results = {}
    for recovery in ("adaptive_bn", "cap", "cap_nobn"):
        metrics = evaluate(policy, task, settings.replace(recovery=recovery), groups=space.groups, base_model=base)
        assert metrics.ok, metrics.error
        results[recovery] = metrics
        record_property(f"{recovery}_accuracy", metrics.accuracy)
        record_property(f"{recovery}_recover_seconds", metrics.timings["recover"])
    assert results["cap"].accuracy > results["adaptive_bn"].accuracy
    assert results["cap_nobn"].accuracy > results["adaptive_bn"].accuracy
    assert results["cap"].flops == results["adaptive_bn"].flops  # same architecture, only weights differ


def test_cap_nobn_keeps_the_trained_bn_statistics(digits):
    task, base, space, settings, calibration, pruned = digits
    plain = copy.deepcopy(pruned)
    model = recover("cap_nobn", copy.deepcopy(pruned), base=base, task=task, settings=settings,
                    calibration=calibration)
    with_bn = recover("cap", copy.deepcopy(pruned), base=base, task=task, settings=settings, calibration=calibration)
    stats = [k for k in model.state_dict() if k.endswith(("running_mean", "running_var"))]
    assert stats
    assert all(torch.equal(model.state_dict()[k], plain.state_dict()[k]) for k in stats)
    assert any(not torch.equal(with_bn.state_dict()[k], plain.state_dict()[k]) for k in stats)
    weights = [k for k in model.state_dict() if k.endswith("weight")]
    assert any(not torch.equal(model.state_dict()[k], plain.state_dict()[k]) for k in weights)


def test_compensation_reports_and_logs_what_it_skipped(digits, caplog):
    task, base, space, settings, calibration, pruned = digits
    model = copy.deepcopy(pruned)
    with caplog.at_level(logging.INFO, logger="evaluators.compensation"):
        report = compensate(model, base, calibration)
    kinds = {r.name: r.kind for r in report.layers}
    assert "fc" in report.compensated  # a Linear consumer
    assert any(kinds[n] == "Conv2d" for n in report.compensated)
    depthwise = [n for n, why in report.skipped.items() if "depthwise" in why]
    assert depthwise and all(n in caplog.text for n in depthwise)
    assert report.seconds > 0
    for r in report.layers:
        if r.skipped is None:
            assert r.error_after <= r.error_before


def test_compensation_leaves_the_base_model_and_output_shape_alone(digits):
    task, base, space, settings, calibration, pruned = digits
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = copy.deepcopy(pruned)
    compensate(model, base, calibration)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert model(task.example_inputs).shape == base(task.example_inputs).shape
    assert [p.shape for p in model.parameters()] == [p.shape for p in pruned.parameters()]


def test_replaying_unchanged_activations_gives_identical_weights(digits, monkeypatch):
    task, base, space, settings, calibration, pruned = digits
    fast = copy.deepcopy(pruned)
    compensate(fast, base, calibration)
    monkeypatch.setattr(compensation, "_REPLAY_BYTES", 0)  # recompute every pass from scratch
    slow = copy.deepcopy(pruned)
    compensate(slow, base, calibration)
    for (name, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
        assert torch.equal(a, b), name


def test_compensation_is_deterministic(digits):
    task, base, space, settings, calibration, pruned = digits
    a, b = copy.deepcopy(pruned), copy.deepcopy(pruned)
    compensate(a, base, calibration, CaPConfig(seed=3))
    compensate(b, base, calibration, CaPConfig(seed=3))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_linear_consumers_of_token_inputs_are_compensated():
    """Linear layers on (batch, tokens, features) inputs: the fit uses every token row."""
    torch.manual_seed(0)
    cls, make_input = ARCHITECTURES["token_mlp"]
    base, example = cls().eval(), make_input()
    groups = discover_groups(base, example)
    calibration = [(torch.randn(32, *example.shape[1:]), torch.zeros(32, dtype=torch.long)) for _ in range(2)]
    pruned = apply_policy(base, Policy(ratios={g.name: 0.5 for g in groups}), example, groups=groups)
    x = torch.randn(64, *example.shape[1:])
    with torch.no_grad():
        err_before = (pruned(x) - base(x)).pow(2).mean()
        report = compensate(pruned, base, calibration)
        err_after = (pruned(x) - base(x)).pow(2).mean()
    assert report.compensated and all(r.kind == "Linear" for r in report.layers)
    assert err_after < err_before


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.mid = nn.Linear(8, 8)  # applied twice
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.mid(torch.relu(self.fc1(x)))))))


def test_a_consumer_called_twice_is_skipped_with_a_reason(caplog):
    torch.manual_seed(0)
    base, example = _Shared().eval(), torch.randn(1, 6)
    pruned = copy.deepcopy(base)
    _remove(pruned, example, "fc1", [0, 3])
    calibration = [(torch.randn(16, 6), torch.zeros(16, dtype=torch.long))]
    with caplog.at_level(logging.INFO, logger="evaluators.compensation"):
        report = compensate(pruned, base, calibration)
    assert "more than once" in report.skipped["mid"] and "'mid'" in caplog.text
    assert pruned(example).shape == (1, 3)


# -- the recovery as a search dimension ----------------------------------------------------------------
def test_cap_is_a_registered_recovery_and_a_search_choice(digits):
    task, base, space, settings, _, _ = digits
    assert {"cap", "cap_nobn"} <= set(available_recoveries())
    dist = distributions(space)[RECOVERY_PARAM]
    assert list(dist.choices) == ["adaptive_bn", "cap"]
    genome = space.encode(Policy(ratios=space.uniform(0.5).ratios, recovery="cap"))
    policy = space.decode(genome)
    assert policy.recovery == "cap"
    assert space.from_params(space.to_params(policy)) == policy
    rng = np.random.default_rng(0)
    assert {space.sample(rng).recovery for _ in range(20)} == {"adaptive_bn", "cap"}


def test_policy_recovery_overrides_the_settings(digits):
    task, base, space, settings, _, _ = digits
    ratios = space.uniform(0.5).ratios
    by_policy = evaluate(Policy(ratios=ratios, recovery="cap"), task, settings, groups=space.groups, base_model=base)
    by_settings = evaluate(Policy(ratios=ratios), task, settings.replace(recovery="cap"), groups=space.groups,
                           base_model=base)
    assert by_policy.ok and by_policy.accuracy == by_settings.accuracy


# -- bad input -------------------------------------------------------------------------------------------
def _one_line_value_error(fn, match):
    with pytest.raises(ValueError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["cap", "cap_nobn"])
def test_cap_without_calibration_data_is_a_clear_error(name, digits):
    task, base, space, settings, _, pruned = digits
    _one_line_value_error(lambda: compensate(copy.deepcopy(pruned), base, []), "calibration")
    _one_line_value_error(
        lambda: recover(name, copy.deepcopy(pruned), base=base, task=task, settings=settings, calibration=[]),
        f"recovery '{name}' needs calibration",
    )


def test_unknown_recovery_is_a_clear_error(digits):
    task, base, space, settings, calibration, pruned = digits
    _one_line_value_error(
        lambda: recover("capp", pruned, base=base, task=task, settings=settings, calibration=calibration),
        "unknown recovery 'capp'",
    )
    _one_line_value_error(lambda: EvalSettings(recovery="capp"), "unknown recovery 'capp'")
    _one_line_value_error(lambda: check_space_names(SpaceConfig(recoveries=("cap", "capp"))),
                          "unknown recovery 'capp'")


@pytest.mark.parametrize("options, match", [
    ({"ridge": -1.0}, "ridge"), ({"ridge": float("nan")}, "ridge"), ({"max_rows": 0}, "max_rows"),
    ({"sequential": 1}, "sequential"), ({"seed": -1}, "seed"),
])
def test_bad_cap_options(options, match):
    _one_line_value_error(lambda: CaPConfig(**options), match)
