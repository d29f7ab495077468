"""EvaluatorPool on real Ray: same Metrics as in-process, crashes, timeouts, failing policies."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from evaluators.evaluate import evaluate
from evaluators.pool import EvaluatorPool, ensure_ray
from evaluators.tasks import load_task
from spaces.policy import Policy
from spaces.space import SearchSpace
from tests.fakes import FAST_EVAL as FAST

CACHE = Path(__file__).resolve().parents[1] / "studies" / "cache"


@pytest.fixture(scope="module")
def digits():
    task = load_task("digits", cache_dir=CACHE)
    base = task.base_model()
    space = SearchSpace.from_model(base, task.example_inputs, ratio_min=0.4, methods=("l1", "l2"))
    rng = np.random.default_rng(0)
    policies = [space.sample(rng) for _ in range(8)]
    expected = [evaluate(p, task, FAST, groups=space.groups, base_model=base) for p in policies]
    assert all(m.ok for m in expected)
    return task, space, policies, expected


@pytest.fixture(scope="class")
def pool(ray_session, digits):
    # Class-scoped: its two 1-CPU actors fill the 2-CPU test session, so it must be gone
    # before the tests below the class start pools of their own.
    task, space, _, _ = digits
    p = EvaluatorPool(task, groups=space.groups, settings=FAST, workers=2, threads_per_worker=1, window=2)
    yield p
    p.close()


def _drain(pool, timeout_s=120.0):
    out = {}
    deadline = time.monotonic() + timeout_s
    while pool.in_flight and time.monotonic() < deadline:
        for tag, policy, metrics in pool.results(timeout=5.0):
            assert tag not in out, f"tag {tag} returned twice"
            out[tag] = (policy, metrics)
    assert pool.in_flight == 0, "pool did not finish in time"
    return out


def _same(a, b):
    return (a.accuracy, a.flops, a.params, a.flops_ratio, a.params_ratio) == (
        b.accuracy, b.flops, b.params, b.flops_ratio, b.params_ratio)


@pytest.mark.parametrize("kwargs, match", [
    ({"workers": 0}, "workers must be an integer >= 1, got 0"),
    ({"threads_per_worker": 0}, "threads_per_worker must be an integer >= 1, got 0"),
    ({"workers": -2}, "workers must be an integer >= 1, got -2"),
    ({"window": 0}, "window must be an integer >= 1, got 0"),
    ({"max_retries": -1}, "max_retries must be an integer >= 0, got -1"),
    ({"timeout_s": 0}, "timeout_s must be None or a number > 0, got 0"),
    ({"groups": []}, "groups must be a non-empty sequence"),
])
def test_bad_pool_arguments_are_value_errors(digits, kwargs, match):
    task, space, _, _ = digits
    args = {"groups": space.groups, **kwargs}
    with pytest.raises(ValueError, match=match):
        EvaluatorPool(task, **args)


def test_ensure_ray_rejects_bad_cpu_count():
    with pytest.raises(ValueError, match="num_cpus must be an integer >= 1, got 0"):
        ensure_ray(None, 0)


class TestSharedPool:
    """Tests sharing one 2-worker pool (actor start-up is the expensive part)."""

    def test_pool_matches_in_process_evaluate(self, pool, digits):
        _, _, policies, expected = digits
        assert pool.capacity == 4 and pool.in_flight == 0 and pool.results(timeout=0) == []
        for i, policy in enumerate(policies):
            pool.submit(policy, tag=i)
        assert pool.in_flight == 8
        got = _drain(pool)
        assert sorted(got) == list(range(8))
        for i, (policy, metrics) in got.items():
            assert policy == policies[i]
            assert metrics.ok, metrics.error
            assert _same(metrics, expected[i]), (i, metrics, expected[i])
            assert {"prune", "recover", "accuracy", "cost"} <= set(metrics.timings)

    def test_failing_policy_yields_error_and_pool_goes_on(self, pool, digits):
        _, space, policies, expected = digits
        pool.submit(Policy(ratios={"not.a.group": 0.5}), tag="bad")
        pool.submit(policies[0], tag="good", settings=FAST.replace(fidelity="cheap"))
        got = _drain(pool)
        assert "unknown group name 'not.a.group'" in got["bad"][1].error
        good = got["good"][1]
        assert good.ok and good.fidelity == "cheap" and _same(good, expected[0])

    def test_sigkilled_worker_is_replaced_and_all_results_arrive(self, pool, digits):
        _, _, policies, expected = digits
        restarts = pool.restarts
        for i, policy in enumerate(policies):
            pool.submit(policy, tag=i)
        got = {tag: (p, m) for tag, p, m in pool.results(timeout=60)}  # both workers are now busy
        assert got and pool.in_flight >= 4
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        got.update(_drain(pool))
        assert sorted(got) == list(range(8))
        assert pool.restarts == restarts + 1
        assert victim not in pool.worker_pids()
        for i, (_, metrics) in got.items():
            assert metrics.ok, metrics.error
            assert _same(metrics, expected[i])


def test_timeout_kills_the_worker_and_reports_failure(ray_session, digits):
    task, space, policies, expected = digits
    slow = FAST.replace(recovery="finetune", finetune_steps=10**6)
    with EvaluatorPool(task, groups=space.groups, settings=FAST, workers=1, timeout_s=3.0, window=2) as pool:
        pool.wait_ready(timeout=60)
        first_pid = pool.worker_pids()[0]
        pool.submit(policies[1], tag="slow", settings=slow)
        pool.submit(policies[2], tag="after")  # queued behind the slow one on the same actor
        got = _drain(pool)
        assert "timeout after 3 s" in got["slow"][1].error
        assert got["after"][1].ok and _same(got["after"][1], expected[2])
        assert pool.restarts == 1 and pool.worker_pids()[0] != first_pid


def test_worker_that_keeps_dying_gives_failure_after_retries(ray_session, digits):
    task, space, policies, _ = digits
    with EvaluatorPool(task, groups=space.groups, settings=FAST, workers=1, max_retries=0) as pool:
        pool.submit(policies[0], tag=0, settings=FAST.replace(recovery="finetune", finetune_steps=10**6))
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        got = _drain(pool)
        assert "worker died 1 times" in got[0][1].error
    with pytest.raises(ValueError, match="closed"):
        pool.submit(policies[0])


PLUGIN = '''
from tests.fakes import tiny_task


def make(samples: int = 32):
    return tiny_task(samples=samples)
'''


def test_workers_build_the_task_from_its_spec_and_no_dataset_is_shipped(ray_session, tmp_path, monkeypatch):
    """A task from load_task (a plugin beside the study, not on the workers' import path):
    the object store gets its spec and the base weights, not its ~9 MB of splits; the
    workers' task gives the in-process Metrics."""
    import pickle
    import sys
    import textwrap

    import ray

    (tmp_path / "pool_plugin_beside.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    task = load_task("pool_plugin_beside:make", {"samples": 1000})
    space = SearchSpace.from_model(task.base_model(), task.example_inputs, ratio_min=0.4)
    policies = [space.sample(np.random.default_rng(i)) for i in range(2)]
    expected = [evaluate(p, task, FAST, groups=space.groups) for p in policies]
    put, sizes = ray.put, []
    monkeypatch.setattr(ray, "put", lambda value, **kw: (sizes.append(len(pickle.dumps(value))), put(value, **kw))[1])
    with EvaluatorPool(task, groups=space.groups, settings=FAST, workers=1) as pool:
        for i, policy in enumerate(policies):
            pool.submit(policy, tag=i)
        got = _drain(pool)
    data = len(pickle.dumps((task.train, task.calibration, task.validation)))
    weights = len(pickle.dumps(dict(task.base_state)))
    assert data > 9_000_000 and sizes and sum(sizes) < weights + 100_000, (sizes, weights, data)
    for i, (_, metrics) in got.items():
        assert metrics.ok, metrics.error
        assert _same(metrics, expected[i])
    # a task built by hand (no spec) is still shipped whole: the in-process path of tests
    sizes.clear()
    task.spec = None
    with EvaluatorPool(task, groups=space.groups, settings=FAST, workers=1) as pool:
        pool.submit(policies[0], tag=0)
        assert _same(_drain(pool)[0][1], expected[0])
    assert max(sizes) > data
