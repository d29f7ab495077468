"""The measured latency table: LatencyConfig, caching, the fitted predictor, spanning policies."""

from __future__ import annotations

import time

import pytest
import torch

from evaluators.latency_table import LatencyConfig, build_latency_table, spanning_policies
from spaces.latency import predict_latency_ms
from spaces.space import SearchSpace
from tests.architectures import PlainCNN

FAST = dict(runs=3, warmup=1, levels=(0.5,))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = PlainCNN().eval()
    example = torch.randn(1, 3, 16, 16)
    return model, example, SearchSpace.from_model(model, example, ratio_min=0.1)


def test_cache_is_reused_and_cheap(setup, tmp_path):
    model, example, space = setup
    settings = LatencyConfig(**FAST)
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
    a = build_latency_table(model, example, space, LatencyConfig(**FAST), cache_dir=tmp_path)
    b = build_latency_table(model, example, space, LatencyConfig(**FAST, **change), cache_dir=tmp_path)
    assert a.key != b.key
    assert len(list(tmp_path.glob("latency-*.json"))) == 2


def test_built_table_is_fitted_on_every_timed_model(setup):
    model, example, space = setup
    table = build_latency_table(model, example, space, LatencyConfig(runs=2, warmup=1, levels=(0.5,), calibration=3))
    assert table.predictor == "fitted" and "intercept" in table.coefficients
    assert set(table.deltas) == set(space.group_names)
    assert 0.05 * table.base_ms <= predict_latency_ms(table, space, space.uniform(0.5))


def test_spanning_policies_cover_small_and_large_models(setup):
    _, _, space = setup
    ratios = [space.flops_ratio(p) for p in spanning_policies(space, 30, seed=0)]
    assert min(ratios) < 0.2 and max(ratios) > 0.6
    assert spanning_policies(space, 5, seed=1) == spanning_policies(space, 5, seed=1)


@pytest.mark.parametrize("kwargs", [{"calibration": -1}, {"predictor": "magic"}])
def test_bad_predictor_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="latency"):
        LatencyConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"threads": 0}, {"runs": 0}, {"levels": (1.0,)}, {"levels": ()}])
def test_bad_latency_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="latency"):
        LatencyConfig(**kwargs)


def test_config_reads_its_table_and_names_unknown_keys():
    config = LatencyConfig.from_dict({"batch": 8, "levels": [0.75, 0.25]})
    assert config.batch == 8 and config.levels == (0.25, 0.75) and config.runs == LatencyConfig().runs
    with pytest.raises(ValueError, match=r"unknown key 'rounds' in \[latency\]"):
        LatencyConfig.from_dict({"rounds": 3})


def test_table_key_ignores_whether_the_table_is_used(setup):
    from evaluators.latency_table import table_key

    model, _, space = setup
    assert table_key(model, space, LatencyConfig(table=False)) == table_key(model, space, LatencyConfig())
    assert table_key(model, space, LatencyConfig(runs=4)) != table_key(model, space, LatencyConfig())
