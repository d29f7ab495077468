"""The study's trial budget as one launcher sees it.

``n_trials`` is the whole study's budget: it counts finished trials (COMPLETE, and FAIL
produced by the evaluation itself) of every launcher, so launchers running on one study at
the same time spend it together and the study ends with exactly ``n_trials``. While no
other launcher is alive this launcher's own count is exact and the storage is read at most
every ``OTHERS_RECHECK_S``; otherwise the storage-wide claims (``claimed_trials``) bound it.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any

from search.launchers import (
    GRACE_S,
    HEARTBEAT_S,
    Launcher,
    claimed_trials,
    other_live_launchers,
    read_launchers,
    write_heartbeat,
)

# How often a launcher running alone looks for other launchers on its study (seconds).
OTHERS_RECHECK_S = 1.0


class Budget:
    """This launcher's share of the study: trials it may still create, its heartbeat."""

    def __init__(self, n_trials: int | None, finished: int, storage: Any, study_id: int, me: Launcher,
                 timers: collections.Counter | None = None) -> None:
        self.n_trials = n_trials
        self.finished = finished
        self.storage = storage
        self.study_id = study_id
        self.me = me
        self.timers = timers if timers is not None else collections.Counter()
        # set once other launchers' trials filled the study's budget
        self.exhausted = False
        self.others_alive, self.others_checked = False, -math.inf
        self.last_heartbeat = time.monotonic()

    def left(self, in_flight: int) -> int | None:
        """Trials still to create, given ``in_flight`` trials of this launcher running."""
        n = self.n_trials
        if n is None:
            return None
        if self.exhausted:
            return 0
        left = n - self.finished - in_flight
        if left > 0:
            claims = self.shared_claims()
            if claims is not None:
                left = min(left, n - claims)
        return left

    def shared_claims(self, below: int | None = None, always: bool = False) -> int | None:
        """Trials holding a place in the budget study-wide (see ``claimed_trials``).

        ``None`` when no other launcher is alive and not ``always``: then this launcher's
        own count is exact. Alone, the launcher table is read at most every
        ``OTHERS_RECHECK_S`` (a read per trial costs ~5 ms on SQLite): a launcher that
        starts in between can only make this one create a trial ``over_budget`` takes back.
        """
        t = time.thread_time()
        try:
            now = time.monotonic()
            if not always and not self.others_alive and now - self.others_checked < OTHERS_RECHECK_S:
                return None
            launchers = read_launchers(self.storage, self.study_id)
            self.others_checked = now
            self.others_alive = bool(other_live_launchers(launchers, self.me, GRACE_S))
            if not always and not self.others_alive:
                return None
            trials = self.storage.get_all_trials(self.study_id, deepcopy=False)
            return claimed_trials(trials, launchers, self.me, GRACE_S, below=below)
        finally:
            self.timers["storage"] += time.thread_time() - t

    def heartbeat(self) -> None:
        """Refresh this launcher's heartbeat (at most every ``HEARTBEAT_S``): it is alive."""
        if time.monotonic() - self.last_heartbeat >= HEARTBEAT_S:
            t = time.thread_time()
            self.me = write_heartbeat(self.storage, self.study_id, self.me)
            self.timers["storage"] += time.thread_time() - t
            self.last_heartbeat = time.monotonic()

    def over_budget(self, number: int) -> bool:
        """Whether trial ``number``, just created, has no place in the budget.

        Another launcher may have created trials between this launcher's budget check and
        this trial's creation. Trial numbers are unique and follow creation order (Optuna
        locks the study row in RDB storages; a journal is a log), so the first ``n_trials``
        trials by number are the budget. Fewer than ``n_trials`` trials exist below
        ``number`` when it is below ``n_trials``: then no read is needed.
        """
        n = self.n_trials
        if n is None or number < n:
            return False
        return self.shared_claims(below=number, always=True) >= n
