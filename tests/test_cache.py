"""ResultCache: finished results by evaluation, evaluations under way and their followers."""

from __future__ import annotations

from optuna.trial import TrialState

from evaluators.metrics import Metrics
from search.cache import ResultCache, cache_key
from search.records import TrialRecord
from spaces.policy import Policy

OK = Metrics(accuracy=0.9, flops=1.0, params=1.0, flops_ratio=0.5, params_ratio=0.5)
FAILED = Metrics.failure("boom")
POLICY = Policy(ratios={"a": 0.5})


def record(number: int, state: TrialState, settings: dict | None = None) -> TrialRecord:
    return TrialRecord(number=number, trial_id=number, state=state, searcher="s", generation=0, fidelity="full",
                       policy=POLICY, metrics=OK if state == TrialState.COMPLETE else FAILED, values=None,
                       constraints={}, run=None, settings=settings or {})


def test_the_key_is_policy_and_setting_overrides_in_any_order():
    assert cache_key("p", {"a": 1, "b": 2}) == cache_key("p", {"b": 2, "a": 1}) != cache_key("p", {})


def test_only_complete_trials_are_remembered_and_the_first_one_wins():
    cache = ResultCache()
    cache.remember(record(0, TrialState.FAIL))
    assert cache.hit(cache_key(POLICY.key(), {})) is None
    cache.remember(record(1, TrialState.COMPLETE))
    cache.remember(record(2, TrialState.COMPLETE))
    assert cache.hit(cache_key(POLICY.key(), {})) == (1, OK)
    assert cache.hit(cache_key(POLICY.key(), {"bn_batches": 1})) is None


def test_followers_share_a_success_and_retry_a_failure_one_at_a_time():
    cache, key = ResultCache(), cache_key("p", {})
    assert not cache.follow(key, 1)
    cache.start(key, 0)
    assert cache.follow(key, 1) and cache.follow(key, 2)
    assert cache.settle(key, 0, FAILED) == ([], 1)   # trial 1 is evaluated itself
    cache.start(key, 1)
    assert cache.settle(key, 1, OK) == ([2], None)   # trial 2 still followed, now trial 1
    assert cache.settle(key, 1, OK) == ([], None)    # settled once only
