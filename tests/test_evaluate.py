"""In-process evaluate / evaluate_model and EvalSettings validation."""

from __future__ import annotations

import pytest
import torch

from evaluators.evaluate import evaluate, evaluate_model
from evaluators.latency_table import LatencyConfig
from evaluators.metrics import Metrics
from evaluators.prune import apply_policy
from evaluators.recover import recover
from evaluators.settings import EvalSettings
from spaces.policy import Policy
from tests.fakes import FAST_EVAL as FAST


@pytest.fixture(scope="module")
def digits(digits_l1_taylor):
    return digits_l1_taylor


def _eval(digits, policy, settings=FAST, **kwargs):
    task, base, space = digits
    return evaluate(policy, task, settings, groups=space.groups, base_model=base, **kwargs)


def test_unpruned_policy_reproduces_the_base_model(digits):
    task, base, space = digits
    m = _eval(digits, space.uniform(1.0), EvalSettings())
    assert m.ok and m.fidelity == "full"
    x, y = task.validation
    with torch.no_grad():
        base_acc = (base(x).argmax(1) == y).float().mean().item()
    assert m.accuracy == pytest.approx(base_acc, abs=1 / len(y) + 1e-9)  # BN re-estimated on calibration data
    assert m.flops_ratio == 1.0 and m.params_ratio == 1.0
    assert m.latency_ms is None
    assert {"prune", "recover", "accuracy", "cost"} <= set(m.timings) and "latency" not in m.timings
    assert m.eval_seconds >= sum(m.timings.values()) * 0.99


def test_metrics_match_cost_model_and_shrink_with_ratio(digits):
    _, _, space = digits
    results = {}
    for ratio in (0.8, 0.5):
        policy = space.uniform(ratio)
        m = _eval(digits, policy)
        predicted = space.predict_cost(policy)
        assert m.ok
        assert m.flops == pytest.approx(predicted.flops, rel=1e-2)
        assert m.params == pytest.approx(predicted.params, rel=1e-2)
        assert m.flops_ratio == pytest.approx(m.flops / space.base_cost.flops)
        results[ratio] = m
    assert results[0.5].flops < results[0.8].flops and results[0.5].accuracy < results[0.8].accuracy


def test_evaluate_is_deterministic_given_the_seed(digits):
    _, _, space = digits
    policy = Policy(ratios={g.name: 0.6 for g in space.groups}, method="taylor")
    a, b = _eval(digits, policy), _eval(digits, policy)
    assert a.ok and (a.accuracy, a.flops, a.params) == (b.accuracy, b.flops, b.params)
    # the default call (no precomputed groups/base/cost) gives the same numbers
    task = digits[0]
    c = evaluate(policy, task, FAST)
    assert (c.accuracy, c.flops, c.params, c.flops_ratio) == (a.accuracy, a.flops, a.params, a.flops_ratio)


def test_repeats_average_the_runs_of_consecutive_seeds(digits):
    _, _, space = digits
    policy = space.uniform(0.5)
    tune = FAST.replace(recovery="finetune", finetune_steps=3, seed=5)
    runs = [_eval(digits, policy, tune.replace(seed=s)) for s in (5, 6)]
    assert runs[0].accuracy != runs[1].accuracy   # the seed moves a fine-tune's result
    both = _eval(digits, policy, tune.replace(repeats=2))
    assert both.ok and both.accuracy == pytest.approx((runs[0].accuracy + runs[1].accuracy) / 2)
    assert both.values["accuracy"] == both.accuracy and both.flops == runs[0].flops
    assert {"prune", "recover", "accuracy"} <= set(both.timings) and both.eval_seconds >= sum(both.timings.values())


def test_repeats_time_the_latency_once(digits, monkeypatch):
    from evaluators import timing
    _, _, space = digits
    calls = []
    real = timing.measure_paired_ms
    monkeypatch.setattr(timing, "measure_paired_ms", lambda *a, **k: calls.append(1) or real(*a, **k))
    settings = FAST.replace(measure_latency=True, latency=LatencyConfig(runs=2, batch=2), repeats=3)
    m = _eval(digits, space.uniform(0.7), settings)
    assert m.ok and m.latency_ms > 0 and len(calls) == 1


def test_latency_and_fidelity_and_eval_samples(digits):
    _, _, space = digits
    settings = FAST.replace(measure_latency=True, latency=LatencyConfig(runs=3, batch=2), eval_samples=37,
                            fidelity="cheap")
    m = _eval(digits, space.uniform(0.7), settings)
    assert m.ok and m.fidelity == "cheap"
    assert m.latency_ms > 0 and "latency" in m.timings
    assert round(m.accuracy * 37, 6) == round(m.accuracy * 37)  # scored on exactly 37 samples


def test_measured_latency_is_paired_with_the_unpruned_model(digits):
    _, _, space = digits
    settings = FAST.replace(measure_latency=True, latency=LatencyConfig(runs=10, batch=8), eval_samples=37)
    full, small = (_eval(digits, space.uniform(r), settings) for r in (1.0, 0.3))
    assert 0.5 < full.latency_ratio < 2.0       # the base timed against itself (loose: CI machines are shared)
    assert small.latency_ratio < full.latency_ratio


def test_policy_recovery_overrides_settings(digits):
    _, _, space = digits
    ratios = {g.name: 0.5 for g in space.groups}
    via_policy = _eval(digits, Policy(ratios=ratios, recovery="none"), FAST)
    via_settings = _eval(digits, Policy(ratios=ratios), FAST.replace(recovery="none"))
    adaptive = _eval(digits, Policy(ratios=ratios), FAST)
    assert via_policy.accuracy == via_settings.accuracy != adaptive.accuracy


@pytest.mark.parametrize("policy, match", [
    (Policy(ratios={"no.such.layer": 0.5}), "unknown group name 'no.such.layer'"),
    (Policy(ratios={"stem.0": 0.5}, method="nonsense"), "unknown method 'nonsense'"),
    (Policy(ratios={"stem.0": 0.5}, recovery="nonsense"), "unknown recovery 'nonsense'"),
])
def test_failing_policy_gives_metrics_error_not_an_exception(digits, policy, match):
    m = _eval(digits, policy, FAST.replace(fidelity="cheap"))
    assert isinstance(m, Metrics) and not m.ok and m.accuracy is None
    assert m.error.startswith("ValueError") and match in m.error and "\n" not in m.error
    assert m.fidelity == "cheap" and m.eval_seconds >= 0


def test_evaluate_model_measures_an_already_pruned_model(digits):
    task, base, space = digits
    policy = space.uniform(0.6)
    from evaluators.build import calibration_batches

    calibration = calibration_batches(task, FAST)
    pruned = apply_policy(base, policy, task.example_inputs, calibration, groups=space.groups)
    pruned = recover("adaptive_bn", pruned, base=base, task=task, settings=FAST, calibration=calibration)
    direct = evaluate_model(pruned, task, FAST)
    via_policy = _eval(digits, policy)
    assert (direct.accuracy, direct.flops, direct.params, direct.flops_ratio) == (
        via_policy.accuracy, via_policy.flops, via_policy.params, via_policy.flops_ratio)


@pytest.mark.parametrize("field, value", [
    ("recovery", "magic"), ("calibration_samples", 0), ("bn_batches", 0), ("finetune_steps", -1),
    ("finetune_lr", 0.0), ("temperature", -1.0), ("batch_size", 0), ("eval_samples", 0),
    ("latency", "fast"), ("threads", 0), ("seed", -1), ("fidelity", ""), ("repeats", 0),
    ("kd", "yes"), ("threads", 1.5), ("batch_size", True),
])
def test_settings_reject_bad_values_naming_them(field, value):
    with pytest.raises(ValueError, match=field) as info:
        EvalSettings(**{field: value})
    assert repr(value) in str(info.value) and "\n" not in str(info.value)


def test_settings_round_trip_and_unknown_keys():
    s = EvalSettings(recovery="finetune", finetune_steps=5, eval_samples=100)
    assert EvalSettings.from_dict(s.to_dict()) == s
    assert s.replace(seed=3).seed == 3
    with pytest.raises(ValueError, match="unknown evaluation setting\\(s\\): steps"):
        EvalSettings.from_dict({"steps": 3})
    assert EvalSettings(calibration_samples=256, bn_batches=4).calibration_batch_size == 64
    assert EvalSettings(calibration_samples=100, bn_batches=3).calibration_batch_size == 34


@pytest.mark.parametrize("key, moved_to", [("latency_batch", "batch"), ("latency_runs", "runs")])
def test_settings_name_where_a_moved_latency_key_lives(key, moved_to):
    with pytest.raises(ValueError, match=rf"{key} is now \[latency\] {moved_to}"):
        EvalSettings.from_dict({key: 4})


def test_settings_carry_the_latency_config_and_read_it_back_from_a_dict():
    s = EvalSettings(latency=LatencyConfig(batch=4, runs=6))
    assert EvalSettings.from_dict(s.to_dict()) == s
    assert s.replace(latency={"batch": 2}).latency == LatencyConfig(batch=2)


def test_evaluate_leaves_the_callers_random_stream_alone(digits):
    _, _, space = digits
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _eval(digits, space.uniform(0.7))
    assert torch.equal(torch.rand(3), expected)
