"""CPU timing: plain and paired latency, fixed threads, the allocator setting, input batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from evaluators.timing import keep_freed_memory, latency_inputs, measure_latency_ms, measure_paired_ms, torch_threads
from tests.architectures import PlainCNN


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    return PlainCNN().eval(), torch.randn(1, 3, 16, 16)


def test_latency_is_a_positive_median_and_restores_threads():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    before = torch.get_num_threads()
    ms = measure_latency_ms(model, torch.randn(2, 3, 16, 16), runs=5, warmup=1, threads=1)
    assert math.isfinite(ms) and ms > 0
    assert torch.get_num_threads() == before
    big = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(6)]).eval()
    small = nn.Conv2d(8, 8, 1).eval()
    x = torch.randn(4, 8, 32, 32)
    assert measure_latency_ms(big, x, runs=5) > measure_latency_ms(small, x, runs=5)


@pytest.mark.parametrize("kwargs, match", [
    ({"runs": 0}, "runs must be an integer >= 1, got 0"),
    ({"warmup": -1}, "warmup must be an integer >= 0, got -1"),
    ({"threads": 0}, "threads must be an integer >= 1, got 0"),
])
def test_latency_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_latency_ms(nn.Identity(), torch.zeros(1, 2), **kwargs)


def test_latency_inputs_and_thread_context():
    x = torch.randn(1, 3, 4, 4)
    batch = latency_inputs(x, 5)
    assert batch.shape == (5, 3, 4, 4) and torch.equal(batch[3], x[0])
    with pytest.raises(ValueError, match="latency batch must be an integer >= 1, got 0"):
        latency_inputs(x, 0)
    before = torch.get_num_threads()
    with torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


def test_measure_latency_is_positive_and_restores_threads(setup):
    model, example = setup
    before = torch.get_num_threads()
    assert measure_latency_ms(model, example, runs=3, threads=1) > 0
    assert torch.get_num_threads() == before


def test_paired_timing_tells_a_big_model_from_a_small_one():
    big = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Conv2d(64, 64, 3, padding=1))
    small = torch.nn.Sequential(torch.nn.Conv2d(64, 4, 1))
    x = torch.randn(4, 64, 32, 32)
    big_ms, small_ms = measure_paired_ms(big, small, x, rounds=5, warmup=1)
    assert big_ms > 5 * small_ms > 0


def test_allocator_tuning_is_idempotent():
    assert keep_freed_memory() == keep_freed_memory()


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
