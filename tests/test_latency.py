import time

import pytest
import torch

from spaces.latency import LatencySettings, LatencyTable, build_latency_table, measure_latency_ms, predict_latency_ms
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


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"threads": 0}, {"runs": 0}, {"levels": (1.0,)}, {"levels": ()}])
def test_bad_latency_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="latency"):
        LatencySettings(**kwargs)
