"""Results shared between trials: a proposal is never evaluated twice.

A proposal whose (watermarked) policy and evaluation settings already have a COMPLETE
trial is recorded with the earlier metrics (``metrics.cached_from``); one whose evaluation
is under way waits for it (a *follower*) and shares its result. A failed evaluation may be
transient: its first follower is then evaluated itself, the others keep following it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from evaluators.metrics import Metrics
from search.records import TrialRecord
from optuna.trial import TrialState

CacheKey = tuple[str, str]


def cache_key(policy_key: str, overrides: Mapping[str, Any]) -> CacheKey:
    """What makes two trials the same evaluation: policy and evaluation-setting overrides."""
    return (policy_key, json.dumps(overrides, sort_keys=True))


class ResultCache:
    """Finished results by cache key, and the evaluations under way with their followers."""

    def __init__(self) -> None:
        self._done: dict[CacheKey, tuple[int, Metrics]] = {}
        self._evaluating: dict[CacheKey, int] = {}     # cache key -> trial being evaluated
        self._followers: dict[int, list[int]] = {}     # that trial -> trials awaiting it

    def remember(self, record: TrialRecord) -> None:
        """Keep a COMPLETE trial's metrics for later proposals of the same evaluation."""
        if record.state == TrialState.COMPLETE and record.policy is not None and record.metrics is not None:
            self._done.setdefault(cache_key(record.policy.key(), record.eval_overrides), (record.number, record.metrics))

    def store(self, key: CacheKey, number: int, metrics: Metrics) -> None:
        """Keep trial ``number``'s successful result of ``key`` (a promoted trial's lower rung)."""
        if metrics.ok:
            self._done.setdefault(key, (number, metrics))

    def hit(self, key: CacheKey) -> tuple[int, Metrics] | None:
        """The trial number and metrics of a finished evaluation of ``key``, if any."""
        return self._done.get(key)

    def follow(self, key: CacheKey, number: int) -> bool:
        """Let trial ``number`` wait for the evaluation of ``key`` under way (False: none is)."""
        if key not in self._evaluating:
            return False
        self._followers.setdefault(self._evaluating[key], []).append(number)
        return True

    def start(self, key: CacheKey, number: int) -> None:
        """Trial ``number`` is being evaluated for ``key``."""
        self._evaluating[key] = number

    def settle(self, key: CacheKey, number: int, metrics: Metrics) -> tuple[list[int], int | None]:
        """Trial ``number``'s evaluation ended: the followers that share ``metrics``, and the
        follower to evaluate instead when it failed (``None`` if none)."""
        if self._evaluating.get(key) != number:
            return [], None
        del self._evaluating[key]
        followers = self._followers.pop(number, [])
        if metrics.ok:
            return followers, None
        if not followers:
            return [], None
        if followers[1:]:
            self._followers[followers[0]] = followers[1:]
        return [], followers[0]
