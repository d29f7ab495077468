"""Metrics and the objective registry."""

import pytest

from evaluators.metrics import (
    MAXIMIZE, MINIMIZE, OBJECTIVES, Metrics, Objective, get_objective, register_objective,
)


def test_failure_is_one_line_and_not_ok():
    m = Metrics.failure(ValueError("bad\n  policy"), eval_seconds=1.5, fidelity="cheap")
    assert m.error == "ValueError: bad policy" and not m.ok and m.fidelity == "cheap"
    assert Metrics.from_dict({**Metrics(accuracy=0.5).to_dict(), "unknown": 1}) == Metrics(accuracy=0.5)


def test_built_in_objectives_read_their_metric():
    m = Metrics(accuracy=0.9, flops_ratio=0.4, params_ratio=0.3, latency_ms=2.0, latency_ratio=0.7)
    assert set(OBJECTIVES.names()) >= {"accuracy", "flops", "params", "latency_ms", "latency_ratio"}
    values = {name: get_objective(name).value(m) for name in ("accuracy", "flops", "params", "latency_ms", "latency_ratio")}
    assert values == {"accuracy": 0.9, "flops": 0.4, "params": 0.3, "latency_ms": 2.0, "latency_ratio": 0.7}
    assert get_objective("accuracy").direction == MAXIMIZE and get_objective("flops").direction == MINIMIZE
    assert get_objective("latency_ms").value(Metrics(accuracy=0.9)) is None  # not measured


def test_an_objective_can_be_computed_from_several_fields():
    saved = register_objective("test_saved_params", Objective(MAXIMIZE, read=lambda m: 1.0 - m.params_ratio))
    assert get_objective("test_saved_params") is saved
    assert saved.value(Metrics(params_ratio=0.25)) == 0.75
    with pytest.raises(ValueError, match="already registered"):
        register_objective("test_saved_params", Objective(MINIMIZE, "flops_ratio"))


@pytest.mark.parametrize("make, match", [
    (lambda: Objective("upward", "accuracy"), "unknown objective direction 'upward'"),
    (lambda: Objective(MAXIMIZE, "speed"), "must be a Metrics field or give read="),
    (lambda: get_objective("speed"), r"unknown objective 'speed' \(known: .*accuracy"),
])
def test_bad_objectives_are_one_line_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
