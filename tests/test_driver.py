"""The driver (search.driver) through the test Harness: one Submission per proposal, the
watermark projection, shared evaluations and the order searchers are told in."""

from __future__ import annotations

import optuna
import pytest

from evaluators.metrics import Metrics
from search.base import Proposal, Searcher
from search.driver import mark
from spaces.policy import Policy
from tests.fakes import CountingMark, Harness, synthetic_metrics, tiny_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def space():
    return tiny_space()


class Repeating(Searcher):
    """Proposes the same policy every time (not registered: handed to the Harness directly)."""

    def __init__(self, context, policy: Policy) -> None:
        super().__init__(context)
        self.policy = policy
        self.told: list = []

    def ask(self, n):
        return [Proposal(self.policy) for _ in range(n)]

    def tell(self, outcome):
        self.told.append(outcome)


def test_mark_keeps_the_searchers_policy_in_meta(space):
    own = space.uniform(0.5)
    marked = mark(Proposal(own), CountingMark())
    assert marked.policy != own and Policy.from_json(marked.meta["proposal"]) == own
    assert mark(Proposal(own), None).policy == own
    unchanged = space.uniform(0.6)
    assert mark(Proposal(unchanged), CountingMark()).meta == {}


def test_trials_are_recorded_marked_and_searchers_told_their_own_policy(space):
    watermark = CountingMark()
    h = Harness(space, projection=watermark)
    done = h.run(h.searcher("random", seed=0), 8)
    records = h.records()
    assert len(records) == 8 and watermark.calls == 8  # projected once per submission
    for proposal, record in zip(done, sorted(records, key=lambda r: r.number)):
        assert record.policy == CountingMark().project(proposal.policy)
        if record.policy != proposal.policy:
            assert Policy.from_json(record.meta["proposal"]) == proposal.policy
    # on resume the searcher is given back its own policies
    assert [o.proposal.policy for o in h.outcomes()] == [p.policy for p in done]


def test_equal_proposals_share_one_evaluation(space):
    h = Harness(space)
    evaluated = []

    def metrics(p):
        evaluated.append(p.policy.key())
        return synthetic_metrics(space, p.policy, p.settings)

    s = Repeating(h.context(), space.uniform(0.5))
    h.run(s, 5, window=3, metrics=metrics)
    assert len(evaluated) == 1
    records = sorted(h.records(), key=lambda r: r.number)
    assert [r.cached_from for r in records] == [None, 0, 0, 0, 0]
    assert all(r.metrics.accuracy == records[0].metrics.accuracy for r in records)
    assert [o.number for o in s.told] == [0, 1, 2, 3, 4]  # told in submission order


def test_a_failed_evaluation_is_retried_by_the_first_trial_waiting_for_it(space):
    h = Harness(space)
    calls = {"n": 0}

    def metrics(p):
        calls["n"] += 1
        if calls["n"] == 1:
            return Metrics.failure("transient", fidelity=p.fidelity)
        return synthetic_metrics(space, p.policy, p.settings)

    h.run(Repeating(h.context(), space.uniform(0.5)), 3, window=3, metrics=metrics)
    records = sorted(h.records(), key=lambda r: r.number)
    assert calls["n"] == 2
    assert [r.state for r in records] == [optuna.trial.TrialState.FAIL] + [optuna.trial.TrialState.COMPLETE] * 2
    assert [r.cached_from for r in records] == [None, None, 1]


def test_the_budget_stops_the_run_at_exactly_n_trials(space):
    h = Harness(space)
    h.run(h.searcher("random"), 3)
    h.run(h.searcher("random", seed=1), 4)
    assert len(h.records()) == 7 and all(r.evaluated for r in h.records())
