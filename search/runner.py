"""Run (or resume) a study: ``run_study`` is the one entry point.

``search.setup.prepare`` does every check that can fail on bad input before anything is
written to storage. ``run_study`` then

1. opens or creates the study and registers this launcher (run id, host, pid, heartbeat);
2. resumes (``search.resume``): RUNNING trials of dead launchers are marked FAIL and their
   proposals re-submitted first; each searcher rebuilds its state from its finished trials;
3. runs the driver loop (``search.driver``) until the budget is spent: ``n_trials`` counts
   finished trials of the whole study (``search.budget``), so the study ends with exactly
   ``n_trials``; ``timeout_s`` stops proposing after that many seconds of this run's loop
   (task loading and worker start-up excluded; running evaluations still finish and are
   recorded).
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field

import optuna

from search.base import Proposal
from search.budget import Budget
from search.config import StudyConfig
from search.driver import Driver, Plan, bind_searchers, run_loop
from search.launchers import GRACE_S, Launcher, other_live_launchers, read_launchers, write_heartbeat
from search.progress import Progress
from search.recorder import TrialRecorder
from search.records import TrialRecord, pareto_front, read_trials
from search.resume import own_seeds, resume
from search import setup
from search.setup import PoolFactory, Prepared, default_pool, open_study, prepare
from search.storage import STUDY_ATTR_BASE, STUDY_ATTR_N_TRIALS, close_storage
from search.study_change import rejudge

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a run did and where the study stands.

    ``driver_s`` is the driver thread's CPU time in storage writes (``storage``) and in the
    searchers' ``ask``/``tell`` (``searchers``; for Optuna searchers this includes the
    writes of the trials their samplers fill in). CPU time, not wall time: on a loaded
    machine the driver waits for cores, which is not work it does.
    """

    study_name: str
    storage_url: str
    n_trials: int | None
    finished: int
    new_trials: int
    evaluations: int
    cached: int
    stale_failed: int
    resubmitted: int
    front: list[TrialRecord]
    records: list[TrialRecord]
    elapsed_s: float
    driver_s: dict[str, float] = field(default_factory=dict)
    base: dict | None = None   # the unpruned model's metrics (study user attr ``base``; search.baseline)
    rejudged: int | None = None  # trials whose feasibility changed under new [constraints] (None: no re-judging)

    @property
    def driver_ms_per_trial(self) -> dict[str, float]:
        n = max(1, self.new_trials)
        return {k: 1000.0 * v / n for k, v in self.driver_s.items()}


def plan_of(prepared: Prepared) -> Plan:
    """What the driver needs of a prepared study."""
    config = prepared.config
    return Plan(searchers=prepared.searchers, shares=config.shares, directions=config.study.directions,
                constraint_names=config.constraints.names, ordered=config.study.workers == 1,
                space=prepared.space, projection=prepared.watermark or prepared.fill,
                latency_table=prepared.latency_table,
                promotion=config.promotion)


@dataclass
class _Started:
    """A run's state once the study is open and resumed."""

    prepared: Prepared
    recorder: TrialRecorder
    budget: Budget
    records: list[TrialRecord]
    resubmit: list[tuple[str, Proposal]]   # proposals of dead launchers, submitted first
    stale: int


def _start(prepared: Prepared, storage: optuna.storages.BaseStorage, study: optuna.Study) -> _Started:
    """Register this launcher, resume the study and bind the searchers to the recorder."""
    config = prepared.config
    study_id = storage.get_study_id_from_name(config.name)
    me = write_heartbeat(storage, study_id, Launcher.current())
    if other_live_launchers(read_launchers(storage, study_id), me, GRACE_S):
        prepared = own_seeds(prepared, me)
    recorder = TrialRecorder(storage, config.name, space=prepared.space, settings=config.evaluation,
                             objectives=config.study.objectives, constraints=config.constraints, run_id=me.run_id)
    records, resubmit, stale = resume(prepared, storage, recorder, me, read_trials(study))
    bind_searchers(prepared.searchers, recorder)
    budget = Budget(config.study.n_trials, sum(r.evaluated for r in records), storage, study_id, me)
    return _Started(prepared, recorder, budget, records, resubmit, stale)


def _summary(config: StudyConfig, study: optuna.Study, driver: Driver, run: _Started, start: float) -> RunSummary:
    records = read_trials(study)
    return RunSummary(
        study_name=config.name, storage_url=config.study.storage_url, n_trials=config.study.n_trials,
        finished=sum(r.evaluated for r in records), new_trials=driver.new_trials,
        evaluations=driver.evaluations, cached=driver.cached, stale_failed=run.stale,
        resubmitted=len(run.resubmit), front=pareto_front(records, config.study.directions), records=records,
        elapsed_s=time.monotonic() - start, driver_s=dict(driver.timers),
        base=study.user_attrs.get(STUDY_ATTR_BASE),
    )


def run_study(config: StudyConfig, *, pool_factory: PoolFactory | None = None, ray_address: str | None = None,
              progress: bool = True, prepared: Prepared | None = None) -> RunSummary:
    """Run (or resume) the study described by ``config`` until its budget is spent."""
    start = time.monotonic()
    prepared = prepared or prepare(config)
    config = prepared.config
    factory = pool_factory or default_pool
    if factory is setup.default_pool:  # the Ray pool: start Ray or check the cluster before the first write
        setup.start_ray(prepared, ray_address)
    # re-judging rewrites the study (search.study_change), so it comes before the study is opened
    rejudged = rejudge(config) if prepared.rejudge else None
    storage, study = open_study(prepared)
    if config.study.n_trials is not None:  # `status` reports the budget the latest run was given
        study.set_user_attr(STUDY_ATTR_N_TRIALS, config.study.n_trials)
    pool = bar = None
    try:
        run = _start(prepared, storage, study)
        pool = factory(run.prepared, ray_address)
        driver = Driver(plan_of(run.prepared), pool, run.recorder, run.budget, run.records, run.budget.me.run_id)
        n_trials = config.study.n_trials
        bar = Progress(n_trials, min(run.budget.finished, n_trials or run.budget.finished), config.name, progress)
        # the time budget is for searching: task loading and worker start-up do not count
        deadline = time.monotonic() + config.study.timeout_s if config.study.timeout_s > 0 else None
        run_loop(driver, collections.deque(run.resubmit), deadline, bar)
        left = driver.budget_left()
        if left is not None and left > 0 and (deadline is None or time.monotonic() < deadline):
            log.warning("every searcher finished before the budget: %d trial(s) of %d left", left, n_trials)
        summary = _summary(config, study, driver, run, start)
        summary.rejudged = rejudged
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.close()
        close_storage(storage)
    log.info("study %s: %d new trial(s) (%d evaluated, %d cached) in %.1f s; driver %s ms/trial",
             config.name, summary.new_trials, summary.evaluations, summary.cached, summary.elapsed_s,
             {k: round(v, 1) for k, v in summary.driver_ms_per_trial.items()})
    return summary
