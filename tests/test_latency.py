import time

import pytest
import torch

from spaces.latency import (
    LatencySettings, LatencyTable, build_latency_table, fit_latency_model, keep_freed_memory, measure_latency_ms,
    measure_paired_ms, predict_latency_ms, spanning_policies,
)
from spaces.space import SearchSpace
from tests.architectures import PlainCNN

FAST = dict(runs=3, warmup=1, levels=(0.5,))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = PlainCNN().eval()
    example = torch.randn(1, 3, 16, 16)
    return model, example, SearchSpace.from_model(model, example)


def test_cache_is_reused_and_cheap(setup, tmp_path):
    model, example, space = setup
    settings = LatencySettings(**FAST)
    start = time.perf_counter()
    first = build_latency_table(model, example, space, settings, cache_dir=tmp_path)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    second = build_latency_table(model, example, space, settings, cache_dir=tmp_path)
    second_s = time.perf_counter() - start
    assert second == first
    assert second_s < 0.05 * first_s
    assert len(list(tmp_path.glob("latency-*.json"))) == 1


@pytest.mark.parametrize("change", [{"batch": 2}, {"threads": 2}])
def test_cache_is_invalidated_when_batch_or_threads_change(setup, tmp_path, change):
    model, example, space = setup
    a = build_latency_table(model, example, space, LatencySettings(**FAST), cache_dir=tmp_path)
    b = build_latency_table(model, example, space, LatencySettings(**FAST, **change), cache_dir=tmp_path)
    assert a.key != b.key
    assert len(list(tmp_path.glob("latency-*.json"))) == 2


def test_prediction_is_base_plus_group_deltas(setup):
    model, example, space = setup
    table = LatencyTable(base_ms=10.0, levels=(0.5,), deltas={g.name: (-1.0,) for g in space.groups})
    assert predict_latency_ms(table, space, space.uniform(1.0)) == pytest.approx(10.0)
    assert predict_latency_ms(table, space, space.uniform(0.5)) == pytest.approx(10.0 - len(space.groups), abs=0.2)
    assert table.predict({space.groups[0].name: 0.75}) == pytest.approx(9.5)
    assert LatencyTable.from_json(table.to_json()) == table


def test_measure_latency_is_positive_and_restores_threads(setup):
    model, example, _ = setup
    before = torch.get_num_threads()
    assert measure_latency_ms(model, example, runs=3, threads=1) > 0
    assert torch.get_num_threads() == before


def test_fitted_model_recovers_known_costs_by_layer_kind():
    features = [{"conv": c, "depthwise": d, "elementwise": e} for c, d, e in
                [(1e6, 1e4, 5e3), (5e5, 1e4, 2e3), (2e5, 5e3, 1e3), (8e5, 2e3, 4e3), (1e5, 9e3, 9e2), (3e5, 1e3, 3e3)]]
    truth = {"intercept": 0.5, "conv": 2e-6, "depthwise": 3e-5, "elementwise": 1e-4}
    ms = [truth["intercept"] + sum(truth[k] * v for k, v in f.items()) for f in features]
    coef = fit_latency_model(features, ms)
    for k, v in truth.items():
        assert coef[k] == pytest.approx(v, rel=1e-6)
    assert all(v >= 0 for v in coef.values())


def test_fitted_table_ranks_policies_by_their_cost(setup):
    model, example, space = setup
    table = LatencyTable(base_ms=10.0, levels=(0.5,), deltas={g.name: (-1.0,) for g in space.groups},
                         coefficients={"intercept": 1.0, "conv": 1e-6, "linear": 1e-6}, predictor="fitted")
    small, large = space.uniform(0.3), space.uniform(0.9)
    assert predict_latency_ms(table, space, small) < predict_latency_ms(table, space, large)
    expected = 1.0 + 1e-6 * sum(v for k, v in space.cost_model.flops_by_kind(space.kept(large)).items()
                                if k in ("conv", "linear"))
    assert predict_latency_ms(table, space, large) == pytest.approx(expected)
    assert LatencyTable.from_json(table.to_json()) == table


def test_built_table_is_fitted_on_every_timed_model(setup):
    model, example, space = setup
    table = build_latency_table(model, example, space, LatencySettings(runs=2, warmup=1, levels=(0.5,), calibration=3))
    assert table.predictor == "fitted" and "intercept" in table.coefficients
    assert set(table.deltas) == set(space.group_names)
    assert 0.05 * table.base_ms <= predict_latency_ms(table, space, space.uniform(0.5))


def test_paired_timing_tells_a_big_model_from_a_small_one():
    big = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Conv2d(64, 64, 3, padding=1))
    small = torch.nn.Sequential(torch.nn.Conv2d(64, 4, 1))
    x = torch.randn(4, 64, 32, 32)
    big_ms, small_ms = measure_paired_ms(big, small, x, rounds=5, warmup=1)
    assert big_ms > 5 * small_ms > 0


def test_allocator_tuning_is_idempotent():
    assert keep_freed_memory() == keep_freed_memory()


def test_spanning_policies_cover_small_and_large_models(setup):
    _, _, space = setup
    ratios = [space.flops_ratio(p) for p in spanning_policies(space, 30, seed=0)]
    assert min(ratios) < 0.2 and max(ratios) > 0.6
    assert spanning_policies(space, 5, seed=1) == spanning_policies(space, 5, seed=1)


@pytest.mark.parametrize("kwargs", [{"calibration": -1}, {"predictor": "magic"}])
def test_bad_predictor_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="latency"):
        LatencySettings(**kwargs)


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"threads": 0}, {"runs": 0}, {"levels": (1.0,)}, {"levels": ()}])
def test_bad_latency_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="latency"):
        LatencySettings(**kwargs)


def test_paired_timing_of_a_model_against_its_copy_is_near_one():
    import copy

    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())
    x = torch.randn(2, 16, 16, 16)
    ms, ref = measure_paired_ms(model, copy.deepcopy(model), x, rounds=15, warmup=2)
    assert 0.7 < ms / ref < 1.4


def test_paired_timing_rejects_zero_rounds():
    model = torch.nn.Identity()
    with pytest.raises(ValueError):
        measure_paired_ms(model, model, torch.zeros(1), rounds=0)
