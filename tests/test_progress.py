"""LiveFront: the run's feasible full-fidelity front, kept incrementally."""

from __future__ import annotations

from optuna.trial import TrialState

from evaluators.metrics import Metrics
from search.progress import LiveFront
from search.records import TrialRecord, pareto_front
from spaces.policy import Policy

DIRECTIONS = ("maximize", "minimize")


def record(number: int, accuracy: float, flops: float, *, feasible: bool = True, fidelity: str = "full",
           ratio: float | None = None) -> TrialRecord:
    metrics = Metrics(accuracy=accuracy, flops=flops, params=1.0, flops_ratio=flops, params_ratio=1.0)
    policy = Policy(ratios={"a": ratio if ratio is not None else 0.1 + number / 100})
    return TrialRecord(number=number, trial_id=number, state=TrialState.COMPLETE, searcher="s", generation=0,
                       fidelity=fidelity, policy=policy, metrics=metrics, values=(accuracy, flops),
                       constraints={"c": -1.0 if feasible else 1.0}, run=None)


def test_the_live_front_is_the_pareto_front_of_what_it_saw():
    records = [record(0, 0.8, 0.5), record(1, 0.9, 0.6), record(2, 0.85, 0.4), record(3, 0.7, 0.7),
               record(4, 0.99, 0.1, feasible=False), record(5, 0.99, 0.1, fidelity="cheap"),
               record(6, 0.85, 0.4, ratio=0.1 + 2 / 100)]
    live = LiveFront(DIRECTIONS)
    for r in records:
        live.add(r)
    assert sorted(r.number for r in live.front) == sorted(r.number for r in pareto_front(records, DIRECTIONS))
    assert sorted(r.number for r in live.front) == [1, 2]
    assert live.best_accuracy == 0.9
