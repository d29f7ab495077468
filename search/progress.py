"""A run's live view: the feasible front so far, the best accuracy on it, the progress bar."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from search.base import FULL
from search.records import TrialRecord, dominates


class LiveFront:
    """Feasible full-fidelity non-dominated trials, kept incrementally (O(front) per trial)."""

    def __init__(self, directions: Sequence[str]) -> None:
        self.directions = tuple(directions)
        self.front: list[TrialRecord] = []
        self.best_accuracy: float | None = None  # best feasible full-fidelity accuracy
        self.rung_steps = 0   # the highest promotion rung seen (search.records.pareto_front)

    def add(self, r: TrialRecord) -> None:
        if not (r.feasible and r.fidelity == FULL and r.policy is not None and r.values is not None):
            return
        if r.rung_steps != self.rung_steps:   # the front is taken at the highest promotion rung
            if r.rung_steps < self.rung_steps:
                return
            self.front, self.best_accuracy, self.rung_steps = [], None, r.rung_steps
        acc = r.metrics.accuracy if r.metrics is not None else None
        if acc is not None and (self.best_accuracy is None or acc > self.best_accuracy):
            self.best_accuracy = acc
        key = r.policy.key()
        if any(f.policy.key() == key or dominates(f.values, r.values, self.directions) for f in self.front):
            return
        self.front = [f for f in self.front if not dominates(r.values, f.values, self.directions)] + [r]


class Progress:
    """tqdm bar: trials done, feasible front size, best feasible full-fidelity accuracy."""

    def __init__(self, total: int | None, initial: int, name: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=name, unit="trial", disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(self, n: int, live: LiveFront) -> None:
        best = live.best_accuracy
        self.bar.set_postfix(front=len(live.front), best_acc=("-" if best is None else f"{best:.4f}"),
                             refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
