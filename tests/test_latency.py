"""The latency table as data: additive (NetAdapt) and fitted predictions, the fit, JSON."""

import pytest

from spaces.latency import LatencyTable, fit_latency_model, predict_latency_ms
from tests.fakes import tiny_space


@pytest.fixture(scope="module")
def space():
    return tiny_space()


def test_prediction_is_base_plus_group_deltas(space):
    table = LatencyTable(base_ms=10.0, levels=(0.5,), deltas={g.name: (-1.0,) for g in space.groups})
    assert predict_latency_ms(table, space, space.uniform(1.0)) == pytest.approx(10.0)
    assert predict_latency_ms(table, space, space.uniform(0.5)) == pytest.approx(10.0 - len(space.groups), abs=0.2)
    assert table.predict({space.groups[0].name: 0.75}) == pytest.approx(9.5)
    assert LatencyTable.from_json(table.to_json()) == table


def test_fitted_model_recovers_known_costs_by_layer_kind():
    features = [{"conv": c, "depthwise": d, "elementwise": e} for c, d, e in
                [(1e6, 1e4, 5e3), (5e5, 1e4, 2e3), (2e5, 5e3, 1e3), (8e5, 2e3, 4e3), (1e5, 9e3, 9e2), (3e5, 1e3, 3e3)]]
    truth = {"intercept": 0.5, "conv": 2e-6, "depthwise": 3e-5, "elementwise": 1e-4}
    ms = [truth["intercept"] + sum(truth[k] * v for k, v in f.items()) for f in features]
    coef = fit_latency_model(features, ms)
    for k, v in truth.items():
        assert coef[k] == pytest.approx(v, rel=1e-6)
    assert all(v >= 0 for v in coef.values())


def test_fitted_table_ranks_policies_by_their_cost(space):
    table = LatencyTable(base_ms=10.0, levels=(0.5,), deltas={g.name: (-1.0,) for g in space.groups},
                         coefficients={"intercept": 1.0, "conv": 1e-6, "linear": 1e-6}, predictor="fitted")
    small, large = space.uniform(0.3), space.uniform(0.9)
    assert predict_latency_ms(table, space, small) < predict_latency_ms(table, space, large)
    expected = 1.0 + 1e-6 * sum(v for k, v in space.cost_model.flops_by_kind(space.kept(large)).items()
                                if k in ("conv", "linear"))
    assert predict_latency_ms(table, space, large) == pytest.approx(expected)
    assert LatencyTable.from_json(table.to_json()) == table


