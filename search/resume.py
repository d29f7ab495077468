"""Resuming a study: trials of dead launchers, searchers rebuilt, seeds of a second launcher.

A RUNNING trial whose launcher is gone is marked FAIL (user attr ``stale``, not counted in
the budget) and its proposal is re-submitted first; each searcher rebuilds its state from
its finished trials. A launcher that finds another live launcher on its study gives its
searchers their own seeds, or both would propose the very same policies.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

from optuna.trial import TrialState

from search.base import Proposal
from search.launchers import GRACE_S, Launcher, other_live_launchers, read_launchers
from search.recorder import TrialRecorder
from search.records import TrialRecord, read_trials
from search.setup import Prepared, make_searchers

log = logging.getLogger(__name__)


def own_seeds(prepared: Prepared, me: Launcher) -> Prepared:
    """``prepared`` with searchers reseeded by this launcher's run id.

    Another launcher is running the same config on this study: searchers seeded alike would
    propose the very same policies, and both launchers would evaluate them. A launcher that
    runs alone keeps the config's seeds (reproducible runs and resumes).
    """
    config = prepared.config
    log.info("another launcher is running study %s: this launcher's searchers get their own seeds", config.name)
    return dataclasses.replace(prepared, searchers=make_searchers(config, prepared.space, prepared.task,
                                                                   salt=me.run_id))


def _stale_reason(r: TrialRecord, storage: Any, launchers: dict[str, Launcher], me: Launcher,
                  others_alive: bool) -> str | None:
    """Why RUNNING trial ``r`` is stale, or ``None`` while its launcher may still finish it."""
    if r.run is not None:
        owner = launchers.get(r.run)
        if owner is not None and owner.alive(me, GRACE_S):
            return None
        return f"launcher run {r.run} is gone"
    # A sampler's trial exists a moment before the driver writes its attrs (``run``
    # among them): only a live launcher can still be about to write them.
    started = storage.get_trial(r.trial_id).datetime_start
    age = time.time() - started.timestamp() if started is not None else math.inf
    if others_alive and age <= GRACE_S:
        log.warning("trial %d is RUNNING without a launcher id while another launcher runs; leaving it alone",
                    r.number)
        return None
    return "RUNNING without a launcher id: its launcher died before recording the trial"


def fail_stale(prepared: Prepared, storage: Any, recorder: TrialRecorder, me: Launcher,
               records: list[TrialRecord]) -> tuple[list[tuple[str, Proposal]], int]:
    """Mark the RUNNING trials of dead launchers FAIL; returns the proposals to re-submit
    and how many trials were failed."""
    launchers = read_launchers(storage, recorder.study_id)
    others_alive = bool(other_live_launchers(launchers, me, GRACE_S))
    resubmit: list[tuple[str, Proposal]] = []
    stale = 0
    for r in records:
        if r.state != TrialState.RUNNING:
            continue
        reason = _stale_reason(r, storage, launchers, me, others_alive)
        if reason is None:
            continue
        recorder.fail_stale(r, reason)
        stale += 1
        if r.policy is not None and r.searcher in prepared.searchers:
            resubmit.append((r.searcher, r.proposal(prepared.config.evaluation)))
        else:
            log.warning("stale trial %d (searcher %r) is not re-proposed: no recorded policy, or its searcher "
                        "is not in this config", r.number, r.searcher)
    return resubmit, stale


def resume(prepared: Prepared, storage: Any, recorder: TrialRecorder, me: Launcher,
           records: list[TrialRecord]) -> tuple[list[TrialRecord], list[tuple[str, Proposal]], int]:
    """Fail stale RUNNING trials, rebuild searchers; returns records, re-submissions, #stale."""
    config = prepared.config
    resubmit, stale = fail_stale(prepared, storage, recorder, me, records)
    if stale:
        log.info("failed %d stale RUNNING trial(s) of dead launchers; %d re-proposed first", stale, len(resubmit))
        records = read_trials(recorder.fixed_study)
    for name, searcher in prepared.searchers.items():
        outcomes = [r.outcome(config.evaluation, config.constraints.names)
                    for r in records if r.searcher == name and r.evaluated and r.policy is not None]
        pending = [p for label, p in resubmit if label == name]
        if outcomes or pending:
            searcher.rebuild(outcomes, pending)
    return records, resubmit, stale

