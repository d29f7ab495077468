"""The driver loop with a fake pool on the tiny task and real SQLite: trial layout,
shares, budget, determinism, resume after a crash or a clean stop, stale launchers."""

from __future__ import annotations

import json
import os
import random
import socket
import time

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from search.config import load_config
from search.runner import run_study
from search.launchers import Launcher
from search.records import read_trials
from search.storage import open_storage, parse_storage
from tests.fakes import FakePool, tiny_config

optuna.logging.set_verbosity(optuna.logging.WARNING)

TWO = """
[[searchers]]
kind = "tpe"
share = 0.5
[searchers.options]
n_startup_trials = 4

[[searchers]]
kind = "genetic"
share = 0.5
[searchers.options]
population = 4
top_k = 1
"""


def run(config, **pool_kwargs):
    pools = []

    def factory(prepared, address):
        pools.append(FakePool(prepared.space, **pool_kwargs))
        return pools[-1]

    summary = run_study(config, pool_factory=factory, progress=False)
    return summary, pools[0]


def trials_of(config):
    storage = open_storage(parse_storage(config.study.storage_url))
    return optuna.load_study(study_name=config.name, storage=storage).get_trials()


def test_every_proposal_is_one_trial_with_its_attrs(tmp_path):
    config = load_config(tiny_config(tmp_path, n_trials=16, searchers=TWO))
    summary, pool = run(config)
    trials = trials_of(config)
    assert len(trials) == 16 and summary.finished == 16
    assert len(pool.evaluated) == summary.evaluations == 16 - summary.cached
    space_params = None
    for t in trials:
        assert t.state == TrialState.COMPLETE
        ua = t.user_attrs
        assert {"searcher", "generation", "fidelity", "policy", "metrics", "run"} <= set(ua)
        assert ua["searcher"] in {"tpe", "genetic"}
        metrics = ua["metrics"]
        assert metrics["accuracy"] == t.values[0] and metrics["flops_ratio"] == t.values[1]
        assert set(metrics["constraints"]) == {"max_flops_ratio"}
        # named for Optuna's samplers, and the list optuna-dashboard shows (read by Optuna as "0")
        assert t.constraints == {"max_flops_ratio": metrics["constraints"]["max_flops_ratio"],
                                 "0": metrics["constraints"]["max_flops_ratio"]}
        assert metrics["constraints"]["max_flops_ratio"] == pytest.approx(metrics["flops_ratio"] - 0.7)
        policy = json.loads(ua["policy"])
        for group, ratio in policy["ratios"].items():
            assert t.params[group] == pytest.approx(ratio)
        space_params = space_params or set(t.params)
        assert set(t.params) == space_params  # every searcher uses the same param names
    fids = {(t.user_attrs["searcher"], t.user_attrs["fidelity"]) for t in trials}
    assert ("genetic", "cheap") in fids and ("tpe", "full") in fids
    front = summary.front
    assert front and all(r.feasible and r.fidelity == "full" for r in front)


def test_shares_split_the_budget(tmp_path):
    searchers = """
    [[searchers]]
    kind = "random"
    share = 3
    [[searchers]]
    kind = "tpe"
    share = 1
    """
    config = load_config(tiny_config(tmp_path, n_trials=16, searchers=searchers, journal=True))
    summary, _ = run(config)
    counts = {}
    for r in summary.records:
        counts[r.searcher] = counts.get(r.searcher, 0) + 1
    assert counts == {"random": 12, "tpe": 4}


def test_evaluation_failures_count_towards_the_budget(tmp_path):
    config = load_config(tiny_config(tmp_path, n_trials=15, journal=True))
    summary, _ = run(config, fail_when=lambda policy: policy.ratio("fc1") < 0.5)
    states = [r.state for r in summary.records]
    assert len(states) == 15 and summary.finished == 15
    assert TrialState.FAIL in states
    for r in summary.records:
        if r.state == TrialState.FAIL:
            assert r.metrics.error == "synthetic failure" and r.evaluated


def test_same_config_and_seed_with_one_worker_give_the_same_params(tmp_path):
    """Whatever order and batching results arrive in, one worker is processed in order."""

    class Shuffled(FakePool):
        def __init__(self, *a, seed=0, **k):
            super().__init__(*a, **k)
            self.rng = random.Random(seed)

        def results(self, timeout=None):
            out = []
            for _ in range(self.rng.randint(1, max(1, len(self._queue)))):
                out += super().results(timeout)
            self.rng.shuffle(out)
            return out

    sequences = []
    for i, seed in enumerate((0, 1)):
        directory = tmp_path / f"run{i}"
        directory.mkdir()
        config = load_config(tiny_config(directory, n_trials=14, searchers=TWO, journal=True))
        run_study(config, pool_factory=lambda p, a, s=seed: Shuffled(p.space, seed=s), progress=False)
        sequences.append([(t.params, t.user_attrs["fidelity"]) for t in trials_of(config)])
    assert sequences[0] == sequences[1]
    config = load_config(tiny_config(tmp_path, name="other-seed", n_trials=14, searchers=TWO,
                                     journal=True)).with_overrides(seed=1)
    run_study(config, pool_factory=lambda p, a: FakePool(p.space), progress=False)
    assert [(t.params, t.user_attrs["fidelity"]) for t in trials_of(config)] != sequences[0]


def test_resume_after_a_crash_ends_with_exactly_n_trials(tmp_path):
    config = load_config(tiny_config(tmp_path, n_trials=14, searchers=TWO))
    with pytest.raises(RuntimeError, match="simulated launcher crash"):
        run(config, crash_after=6)
    first = trials_of(config)
    running = [t for t in first if t.state == TrialState.RUNNING]
    assert sum(t.state == TrialState.COMPLETE for t in first) == 6 and running
    evaluated_before = {(t.user_attrs["policy"], t.user_attrs["fidelity"]) for t in first
                        if t.state == TrialState.COMPLETE}

    summary, pool = run(config)  # same config again = resume
    trials = trials_of(config)
    stale = [t for t in trials if t.user_attrs.get("stale")]
    assert {t.number for t in stale} == {t.number for t in running}
    assert all(t.state == TrialState.FAIL for t in stale)
    assert summary.finished == 14 == sum(t.state == TrialState.COMPLETE for t in trials)
    assert summary.stale_failed == len(running) == summary.resubmitted
    # the stale policies were proposed again, first
    new = [t for t in trials if t.number > max(x.number for x in first)]
    resubmitted = {(t.user_attrs["policy"], t.user_attrs["fidelity"], t.user_attrs["searcher"]) for t in running}
    assert {(t.user_attrs["policy"], t.user_attrs["fidelity"], t.user_attrs["searcher"])
            for t in new[: len(running)]} == resubmitted
    # nothing finished in the first run was evaluated again
    assert not evaluated_before & {(json.dumps(json.loads(p), sort_keys=True, separators=(",", ":")), f)
                                   for p, f in pool.evaluated}
    assert len(pool.evaluated) == len(set(pool.evaluated))


def test_resume_after_a_clean_stop_reuses_finished_trials(tmp_path):
    genetic_only = """
    [[searchers]]
    kind = "genetic"
    [searchers.options]
    population = 4
    top_k = 1
    """
    straight = load_config(tiny_config(tmp_path, name="straight", n_trials=18, searchers=genetic_only, journal=True))
    run(straight)
    config = load_config(tiny_config(tmp_path, name="stopped", n_trials=18, searchers=genetic_only))
    _, pool1 = run(config.with_overrides(n_trials=11))
    summary, pool2 = run(config)
    assert summary.finished == 18 and len(summary.records) == 18
    assert len(pool1.evaluated) == 11 and len(pool2.evaluated) == 7 - summary.cached
    # the GA rebuilt its state: same params as the uninterrupted run
    assert [t.params for t in trials_of(config)] == [t.params for t in trials_of(straight)]
    # a third run has nothing left to do
    summary, pool3 = run(config)
    assert summary.new_trials == 0 and pool3.evaluated == []


def test_a_repeated_proposal_is_recorded_from_cache_not_evaluated(tmp_path):
    # a one-level space: every proposal is the same policy
    config = load_config(tiny_config(tmp_path, n_trials=5, space="ratio_max = 0.2"))
    summary, pool = run(config)
    assert summary.finished == 5 and len(pool.evaluated) == 1 and summary.cached == 4
    cached = [r for r in summary.records if r.cached_from is not None]
    assert len(cached) == 4 and all(r.cached_from == summary.records[0].number for r in cached)


def test_timeout_stops_proposing_and_leaves_nothing_running(tmp_path):
    config = load_config(tiny_config(tmp_path, n_trials=10_000, journal=True)).with_overrides(timeout_s=1.0)

    class Slow(FakePool):
        def results(self, timeout=None):
            time.sleep(0.05)
            return super().results(timeout)

    start = time.monotonic()
    summary = run_study(config, pool_factory=lambda p, a: Slow(p.space), progress=False)
    assert time.monotonic() - start < 10
    assert 0 < summary.finished < 10_000
    assert all(r.state != TrialState.RUNNING for r in summary.records)


def test_launcher_liveness():
    me = Launcher.current()
    assert Launcher(me.run_id, me.host, me.pid, 0.0).alive(me, 60)                     # this run
    assert not Launcher("earlier", me.host, me.pid, time.time()).alive(me, 60)        # an earlier run here
    assert Launcher("parent", me.host, os.getppid(), time.time()).alive(me, 60)       # live process
    dead = 2**22 + 12345
    assert not Launcher("gone", me.host, dead, time.time()).alive(me, 60)             # dead process
    other = socket.gethostname() + "-elsewhere"
    assert Launcher("remote", other, 1, time.time()).alive(me, 60)                    # fresh heartbeat
    assert not Launcher("remote", other, 1, time.time() - 600).alive(me, 60)          # silent for too long


def test_driver_overhead_is_measured(tmp_path):
    config = load_config(tiny_config(tmp_path, n_trials=12))
    summary, _ = run(config)
    per_trial = summary.driver_ms_per_trial
    assert set(per_trial) == {"storage", "searchers"}
    assert all(v > 0 for v in per_trial.values())
    records = read_trials(optuna.load_study(study_name=config.name,
                                            storage=open_storage(parse_storage(config.study.storage_url))))
    assert len(records) == 12


def test_a_searcher_waiting_for_background_work_is_polled(tmp_path):
    """ask() may return nothing while a searcher's own work runs; the run must not end."""
    from search.base import SEARCHERS, Proposal, Searcher, register_searcher

    @register_searcher("test-slow")
    class Slow(Searcher):
        def __init__(self, context, options=None):
            super().__init__(context, options)
            self.ready_at = time.monotonic() + 0.5
            self.rng = random.Random(0)

        @property
        def waiting(self):
            return time.monotonic() < self.ready_at

        def ask(self, n):
            if self.waiting:
                return []
            self.ready_at = time.monotonic() + 0.1  # next proposal after more "training"
            return [Proposal(self.space.sample(np.random.default_rng(self.rng.randrange(10**6))))]

        def tell(self, outcome):
            pass

    try:
        searchers = """
        [[searchers]]
        kind = "test-slow"
        """
        config = load_config(tiny_config(tmp_path, n_trials=4, searchers=searchers, journal=True))
        summary, _ = run(config)
        assert summary.finished == 4
    finally:
        SEARCHERS.remove("test-slow")
