"""The driver loop: searchers <-> EvaluatorPool <-> one Optuna study.

``prepare`` does every check that can fail on bad input (config, task, space, reachable
constraints, searcher options, an existing study's space/objectives/evaluation) before
anything is written to storage. ``run_study`` then

1. opens or creates the study and registers this launcher (run id, host, pid, heartbeat);
2. resumes: RUNNING trials of dead launchers are marked FAIL (user attr ``stale``, not
   counted) and their proposals re-submitted first; each searcher rebuilds its state from
   its finished trials;
3. loops: fill the pool up to its capacity with proposals (searchers picked by their
   ``share``: the one furthest below its share of trials asks next), record each as one
   trial, collect results, record metrics/constraints/values, tell the searcher;
4. stops proposing once the budget is reached: ``n_trials`` counts finished trials of the
   whole study (COMPLETE, and FAIL produced by the evaluation itself — a Metrics.error —
   but not trials failed as stale), so the study ends with exactly ``n_trials``;
   ``timeout_s`` stops proposing after that many seconds of this run's loop (task loading
   and worker start-up excluded; running evaluations still finish and are recorded).

A proposal whose policy and evaluation settings already have a COMPLETE trial is recorded
as a new trial with the earlier metrics (``metrics.cached_from``) instead of being
evaluated twice. With one worker, results are processed strictly in submission order, so
the same config and seed give the same sequence of trial params whatever the timing.
"""

from __future__ import annotations

import collections
import dataclasses
import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from evaluators.metrics import Metrics
from search.base import FULL, Proposal, Searcher, SearcherContext, make_searcher
from search.config import ConfigError, StudyConfig
from search.launchers import (
    GRACE_S,
    HEARTBEAT_S,
    Launcher,
    claimed_trials,
    other_live_launchers,
    read_launchers,
    write_heartbeat,
)
from search.recorder import TrialRecorder
from search.records import TrialRecord, dominates, pareto_front, read_trials
from search.storage import (
    STUDY_ATTR_EVALUATION,
    STUDY_ATTR_FINGERPRINT,
    STUDY_ATTR_OBJECTIVES,
    STUDY_ATTR_TASK,
    StorageSpec,
    check_compatible,
    close_storage,
    find_study,
    inspect_storage,
    open_storage,
    parse_storage,
)

log = logging.getLogger(__name__)

# How often searchers that wait for their own background work are asked again.
POLL_S = 0.2
# How often a launcher running alone looks for other launchers on its study (seconds).
OTHERS_RECHECK_S = 1.0


@dataclass
class Prepared:
    """Everything validated, nothing written: task, space, searchers, storage location."""

    config: StudyConfig
    task: Any
    space: Any
    spec: StorageSpec
    searchers: dict[str, Searcher]
    existing: bool
    watermark: Any = None   # spaces.watermark.Watermark: every evaluated policy is projected onto it
    latency_table: Any = None  # spaces.latency.LatencyTable: latency_ms of every trial during search


@dataclass
class RunSummary:
    """What a run did and where the study stands.

    ``driver_s`` is the driver thread's CPU time in storage writes (``storage``) and in the
    searchers' ``ask``/``tell`` (``searchers``; for Optuna searchers this includes the
    ``study.ask`` writes of params). CPU time, not wall time: on a loaded machine the
    driver waits for cores, which is not work it does.
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

    @property
    def driver_ms_per_trial(self) -> dict[str, float]:
        n = max(1, self.new_trials)
        return {k: 1000.0 * v / n for k, v in self.driver_s.items()}


def fingerprint_of(config: StudyConfig, space: Any, task: Any) -> dict[str, Any]:
    fp = dict(space.fingerprint())
    fp["task"] = config.task.name
    if config.watermark is not None:  # non-secret scheme only: the key never reaches storage
        fp["watermark"] = config.watermark.scheme()
    return fp


def searcher_seed(seed: int, index: int, salt: str | None = None) -> int:
    entropy = [int(seed), int(index)] + ([int(salt, 16)] if salt is not None else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def make_context(config: StudyConfig, space: Any, index: int, task: Any = None,
                 salt: str | None = None) -> SearcherContext:
    """``salt`` (a launcher's hex run id) gives the searcher its own seed (see ``_own_seeds``)."""
    section = config.searchers[index]
    return SearcherContext(
        task=task,
        space=space,
        objectives=config.study.objectives,
        directions=config.study.directions,
        settings=config.evaluation,
        seed=searcher_seed(config.study.seed, index, salt),
        label=section.name,
        constraint_names=config.constraints.names,
        max_flops_ratio=config.constraints.max_flops_ratio,
    )


def load_task_and_space(config: StudyConfig) -> tuple[Any, Any]:
    """The task (training its base model on first use) and the search space over it."""
    from evaluators.tasks import load_task
    from spaces.space import SearchSpace

    try:
        task = load_task(config.task.name, config.task.options, cache_dir=config.task.cache_dir)
    except ValueError as exc:
        raise ConfigError(f"[task] {config.task.name!r}: {exc}") from None
    try:
        space = SearchSpace.from_model(
            task.base_model(), task.example_inputs, ignored=config.space.ignored, **config.space.space_options()
        )
    except ValueError as exc:
        raise ConfigError(f"[space]: {exc}") from None
    return task, space


def check_constraints_reachable(config: StudyConfig, space: Any) -> None:
    c = config.constraints
    smallest = space.predict_cost(space.uniform(space.ratio_min))
    base = space.base_cost
    for name, bound, reachable in (
        ("max_flops_ratio", c.max_flops_ratio, smallest.flops / base.flops),
        ("max_params_ratio", c.max_params_ratio, smallest.params / base.params),
    ):
        if bound is not None and bound < reachable - 1e-12:
            raise ConfigError(
                f"[constraints] {name} = {bound} is below what the space can reach "
                f"({reachable:.4f} with every group at ratio_min {space.ratio_min}): raise it or lower [space] ratio_min"
            )


def build_watermark(config: StudyConfig, space: Any) -> Any:
    """The study's watermark over ``space`` (None without a [watermark] section)."""
    if config.watermark is None:
        return None
    from spaces.watermark import Watermark

    try:
        return Watermark.from_space(space, config.watermark)
    except ValueError as exc:
        raise ConfigError(f"[watermark]: {exc}") from None


def prepare(config: StudyConfig, *, task_and_space: tuple[Any, Any] | None = None) -> Prepared:
    """Validate everything that can be wrong with the input; write nothing to storage."""
    spec = parse_storage(config.study.storage_url)
    task, space = task_and_space if task_and_space is not None else load_task_and_space(config)
    check_constraints_reachable(config, space)
    watermark = build_watermark(config, space)
    searchers: dict[str, Searcher] = {}
    for i, section in enumerate(config.searchers):
        try:
            searchers[section.name] = make_searcher(section.kind, make_context(config, space, i, task), section.options)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"[[searchers]] {section.name!r}: {exc}") from None
    existing = False
    with inspect_storage(spec) as storage:
        if storage is not None:
            summary = find_study(storage, config.name)
            if summary is not None:
                existing = True
                check_compatible(
                    summary,
                    fingerprint=fingerprint_of(config, space, task),
                    objectives=config.study.objectives,
                    evaluation=config.evaluation.to_dict(),
                    where=config.study.storage_url,
                )
    latency_table = None
    if config.uses_latency and config.latency.table:
        from spaces.latency import build_latency_table

        latency_table = build_latency_table(task.base_model(), task.example_inputs, space,
                                            config.latency.settings(), cache_dir=config.task.cache_dir)
    return Prepared(config=config, task=task, space=space, spec=spec, searchers=searchers, existing=existing,
                    watermark=watermark, latency_table=latency_table)


PoolFactory = Callable[[Prepared, str | None], Any]


def default_pool(prepared: Prepared, ray_address: str | None = None) -> Any:
    from evaluators.pool import EvaluatorPool

    s = prepared.config.study
    return EvaluatorPool(
        prepared.task,
        groups=prepared.space.groups,
        round_to=prepared.space.round_to,
        settings=prepared.config.evaluation,
        workers=s.workers,
        threads_per_worker=s.threads_per_worker,
        timeout_s=s.eval_timeout_s or None,
        max_retries=s.max_retries,
        window=s.window,
        ray_address=ray_address,
    )


def open_study(prepared: Prepared) -> tuple[optuna.storages.BaseStorage, optuna.Study]:
    """Open the storage and load or create the study (the first write of a run)."""
    config = prepared.config
    storage = open_storage(prepared.spec)
    study = optuna.create_study(
        study_name=config.name,
        storage=storage,
        directions=list(config.study.directions),
        load_if_exists=True,
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    if STUDY_ATTR_FINGERPRINT not in study.user_attrs:
        study.set_user_attr(STUDY_ATTR_FINGERPRINT, fingerprint_of(config, prepared.space, prepared.task))
        study.set_user_attr(STUDY_ATTR_OBJECTIVES, list(config.study.objectives))
        study.set_user_attr(STUDY_ATTR_EVALUATION, config.evaluation.to_dict())
        study.set_user_attr(STUDY_ATTR_TASK, {"name": config.task.name, "options": dict(config.task.options)})
    return storage, study


class _Progress:
    """tqdm bar: trials done, feasible front size, best feasible full-fidelity accuracy."""

    def __init__(self, total: int | None, initial: int, name: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=name, unit="trial", disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(self, n: int, front: int, best: float | None) -> None:
        self.bar.set_postfix(front=front, best_acc=("-" if best is None else f"{best:.4f}"), refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _Driver:
    """State of one run's loop (kept in one object so ``run_study`` stays readable)."""

    def __init__(self, prepared: Prepared, storage: Any, study: optuna.Study, pool: Any,
                 recorder: TrialRecorder, me: Launcher, records: list[TrialRecord]) -> None:
        self.p = prepared
        self.config = prepared.config
        self.storage = storage
        self.study = study
        self.pool = pool
        self.recorder = recorder
        self.me = me
        self.searchers = prepared.searchers
        self.shares = self.config.shares
        self.ordered = self.config.study.workers == 1
        self.timers = collections.Counter()
        self.issued = collections.Counter(r.searcher for r in records)
        self.finished = sum(r.evaluated for r in records)
        self.cache: dict[tuple[str, str], tuple[int, Metrics]] = {}
        self.evaluating: dict[tuple[str, str], int] = {}   # cache key -> trial being evaluated
        self.followers: dict[int, list[int]] = {}           # that trial -> trials awaiting it
        self.front: list[TrialRecord] = []      # feasible full-fidelity non-dominated trials
        self.best_accuracy: float | None = None  # best feasible full-fidelity accuracy
        for r in records:
            self._remember(r)
        self.in_flight: dict[int, tuple[str, Proposal, Any]] = {}
        self.order: collections.deque[int] = collections.deque()
        self.arrived: dict[int, tuple[Metrics, int | None]] = {}
        self.new_trials = self.evaluations = self.cached = 0
        self.last_heartbeat = time.monotonic()
        # [reliability fix] set once another launcher's trials filled the study's budget
        self.exhausted = False
        self.others_alive, self.others_checked = False, -math.inf  # see _shared_claims

    # -- bookkeeping ---------------------------------------------------------------------
    def _cache_key(self, policy_key: str, settings: Mapping[str, Any]) -> tuple[str, str]:
        import json

        return (policy_key, json.dumps(settings, sort_keys=True))

    def _remember(self, r: TrialRecord) -> None:
        if r.state == TrialState.COMPLETE and r.policy is not None and r.metrics is not None:
            self.cache.setdefault(self._cache_key(r.policy.key(), r.settings), (r.number, r.metrics))
        if r.feasible and r.fidelity == FULL and r.policy is not None and r.values is not None:
            acc = r.metrics.accuracy if r.metrics is not None else None
            if acc is not None and (self.best_accuracy is None or acc > self.best_accuracy):
                self.best_accuracy = acc
            # incremental front: O(front) per trial instead of O(n^2)
            directions = self.config.study.directions
            key = r.policy.key()
            if any(f.policy.key() == key or dominates(f.values, r.values, directions) for f in self.front):
                return
            self.front = [f for f in self.front if not dominates(r.values, f.values, directions)] + [r]

    def budget_left(self) -> int | None:
        n = self.config.study.n_trials
        if n is None:
            return None
        if self.exhausted:
            return 0
        left = n - self.finished - len(self.in_flight)
        if left > 0:
            # [reliability fix] n_trials is the whole study's budget: launchers running at
            # the same time spend it together, so count their trials too (storage-wide).
            claims = self._shared_claims()
            if claims is not None:
                left = min(left, n - claims)
        return left

    def _shared_claims(self, below: int | None = None, always: bool = False) -> int | None:
        """Trials holding a place in the budget study-wide (see ``claimed_trials``).

        ``None`` when no other launcher is alive and not ``always``: then this launcher's
        own count is exact. Alone, the launcher table is read at most every
        ``OTHERS_RECHECK_S`` (a read per trial cost ~5 ms on SQLite): a launcher that starts
        in between can only make this one create a trial ``_over_budget`` takes back.
        """
        t = time.thread_time()
        try:
            now = time.monotonic()
            if not always and not self.others_alive and now - self.others_checked < OTHERS_RECHECK_S:
                return None
            launchers = read_launchers(self.storage, self.recorder.study_id)
            self.others_checked = now
            self.others_alive = bool(other_live_launchers(launchers, self.me, GRACE_S))
            if not always and not self.others_alive:
                return None
            trials = self.storage.get_all_trials(self.recorder.study_id, deepcopy=False)
            return claimed_trials(trials, launchers, self.me, GRACE_S, below=below)
        finally:
            self.timers["storage"] += time.thread_time() - t

    def _over_budget(self, number: int) -> bool:
        """[reliability fix] Whether trial ``number``, just created, has no place in the budget.

        Another launcher may have created trials between this launcher's budget check and
        this trial's creation. Trial numbers are unique and follow creation order (Optuna
        locks the study row in RDB storages; a journal is a log), so the first ``n_trials``
        placeholders by number are the budget. Fewer than ``n_trials`` trials exist below
        ``number`` when it is below ``n_trials``: then no read is needed.
        """
        n = self.config.study.n_trials
        if n is None or number < n:
            return False
        return self._shared_claims(below=number, always=True) >= n

    # -- proposing -----------------------------------------------------------------------
    def choose(self, blocked: set[str]) -> str | None:
        best, best_key = None, None
        for i, section in enumerate(self.config.searchers):
            name = section.name
            if name in blocked or self.searchers[name].finished:
                continue
            key = ((self.issued[name] + 1) / self.shares[name], i)
            if best_key is None or key < best_key:
                best, best_key = name, key
        return best

    def submit(self, label: str, proposal: Proposal) -> None:
        t = time.thread_time()
        trial = self.recorder.open(label, self._marked(proposal))
        self.timers["storage"] += time.thread_time() - t
        number = trial.number
        if self._over_budget(number):
            # [reliability fix] other launchers took the last places: take this trial back
            self.recorder.fail_over_budget(trial._trial_id, "other launchers filled n_trials first")
            log.info("trial %d: the study's budget was filled by other launchers; stopping", number)
            self.exhausted = True
            return
        self.in_flight[number] = (label, proposal, trial)
        self.order.append(number)
        self.issued[label] += 1
        self.new_trials += 1
        key = self._cache_key(self._marked(proposal).policy.key(), self.recorder.settings_overrides(proposal))
        hit = self.cache.get(key)
        if hit is not None:
            self.cached += 1
            self.arrived[number] = (hit[1], hit[0])
        elif key in self.evaluating:  # the same evaluation is under way: share its result
            self.followers.setdefault(self.evaluating[key], []).append(number)
        else:
            self._evaluate(number, key, proposal)

    def _evaluate(self, number: int, key: tuple[str, str], proposal: Proposal) -> None:
        self.evaluations += 1
        self.evaluating[key] = number
        self.pool.submit(self._marked(proposal).policy, tag=number, settings=proposal.settings)

    def _with_latency(self, proposal: Proposal, metrics: Metrics) -> Metrics:
        """Latency from the measured lookup table (cheap, noise-free ranking during search);
        real latency of the Pareto models is measured at export."""
        table = self.p.latency_table
        if table is None or not metrics.ok:
            return metrics
        from spaces.latency import predict_latency_ms

        ms = predict_latency_ms(table, self.p.space, self._marked(proposal).policy)
        return dataclasses.replace(metrics, latency_ms=ms, latency_ratio=ms / table.base_ms)

    def _marked(self, proposal: Proposal) -> Proposal:
        """``proposal`` projected onto the watermark (what is recorded and evaluated); the
        searcher's own policy is kept in ``meta["proposal"]`` and is what it is told about."""
        wm = self.p.watermark
        if wm is None:
            return proposal
        marked = wm.project(proposal.policy)
        if marked == proposal.policy:
            return proposal
        meta = {**dict(proposal.meta), "proposal": proposal.policy.to_json()}
        return dataclasses.replace(proposal, policy=marked, meta=meta)

    # -- finishing -----------------------------------------------------------------------
    def process(self, number: int, metrics: Metrics, cached_from: int | None, progress: _Progress) -> None:
        label, proposal, trial = self.in_flight.pop(number)
        key = self._cache_key(self._marked(proposal).policy.key(), self.recorder.settings_overrides(proposal))
        if self.evaluating.get(key) == number:
            del self.evaluating[key]
            followers = self.followers.pop(number, [])
            if metrics.ok:
                for follower in followers:
                    self.cached += 1
                    self.arrived[follower] = (metrics, number)
            elif followers:  # a failure may be transient: the first follower is evaluated itself
                self._evaluate(followers[0], key, self.in_flight[followers[0]][1])
                if followers[1:]:
                    self.followers[followers[0]] = followers[1:]
        metrics = self._with_latency(proposal, metrics)
        t = time.thread_time()
        outcome = self.recorder.finish(trial, proposal, metrics, cached_from=cached_from)
        self.timers["storage"] += time.thread_time() - t
        self.finished += 1
        record = TrialRecord(
            number=number, trial_id=trial._trial_id, state=TrialState.COMPLETE if outcome.ok else TrialState.FAIL,
            searcher=label, generation=proposal.generation, fidelity=proposal.fidelity, policy=self._marked(proposal).policy,
            metrics=outcome.metrics, values=outcome.values,
            constraints=dict(zip(self.config.constraints.names, outcome.constraints)), run=self.me.run_id,
            settings=self.recorder.settings_overrides(proposal),
        )
        self._remember(record)
        t = time.thread_time()
        self.searchers[label].tell(outcome)
        self.timers["searchers"] += time.thread_time() - t
        progress.update(1, len(self.front), self.best_accuracy)

    def drain(self, progress: _Progress) -> bool:
        """Process arrived results; True if any. Ordered: only the oldest, if it arrived."""
        done = False
        if self.ordered:
            # One at a time, then refill: what a searcher has seen when it is asked next
            # must not depend on how results happened to be batched.
            if self.order and self.order[0] in self.arrived:
                number = self.order.popleft()
                metrics, cached_from = self.arrived.pop(number)
                self.process(number, metrics, cached_from, progress)
                done = True
        else:
            for number in list(self.arrived):
                metrics, cached_from = self.arrived.pop(number)
                self.order.remove(number)
                self.process(number, metrics, cached_from, progress)
                done = True
        return done

    def heartbeat(self) -> None:
        if time.monotonic() - self.last_heartbeat >= HEARTBEAT_S:
            t = time.thread_time()
            self.me = write_heartbeat(self.storage, self.recorder.study_id, self.me)
            self.timers["storage"] += time.thread_time() - t
            self.last_heartbeat = time.monotonic()


def _own_seeds(prepared: Prepared, me: Launcher) -> Prepared:
    """[reliability fix] Searchers reseeded with this launcher's run id.

    Another launcher is running the same config on this study: searchers seeded alike would
    propose the very same policies, and both launchers would evaluate them. A launcher that
    runs alone keeps the config's seeds (reproducible runs and resumes).
    """
    config = prepared.config
    log.info("another launcher is running study %s: this launcher's searchers get their own seeds", config.name)
    searchers = {
        section.name: make_searcher(section.kind, make_context(config, prepared.space, i, prepared.task, salt=me.run_id),
                                    section.options)
        for i, section in enumerate(config.searchers)
    }
    return dataclasses.replace(prepared, searchers=searchers)


def resume(prepared: Prepared, storage: Any, recorder: TrialRecorder, me: Launcher,
           records: list[TrialRecord]) -> tuple[list[TrialRecord], list[tuple[str, Proposal]], int]:
    """Fail stale RUNNING trials, rebuild searchers; returns records, re-submissions, #stale."""
    config = prepared.config
    launchers = read_launchers(storage, recorder.study_id)
    others_alive = bool(other_live_launchers(launchers, me, GRACE_S))
    resubmit: list[tuple[str, Proposal]] = []
    stale = 0
    for r in records:
        if r.state != TrialState.RUNNING:
            continue
        if r.run is None:
            # [reliability fix] An Optuna searcher's study.ask creates the trial before the
            # runner writes its attrs: a launcher killed in between leaves a RUNNING trial
            # without a run id, which used to stay RUNNING forever. Only a live launcher can
            # still be about to write its attrs, and only for a moment.
            started = storage.get_trial(r.trial_id).datetime_start
            age = time.time() - started.timestamp() if started is not None else math.inf
            if others_alive and age <= GRACE_S:
                log.warning("trial %d is RUNNING without a launcher id while another launcher runs; "
                            "leaving it alone", r.number)
                continue
            reason = "RUNNING without a launcher id: its launcher died before recording the trial"
        else:
            owner = launchers.get(r.run)
            if owner is not None and owner.alive(me, GRACE_S):
                continue
            reason = f"launcher run {r.run} is gone"
        recorder.fail_stale(r, reason)
        stale += 1
        if r.policy is not None and r.searcher in prepared.searchers:
            resubmit.append((r.searcher, r.proposal(config.evaluation)))
        else:
            log.warning("stale trial %d (searcher %r) is not re-proposed: no recorded policy, or its searcher "
                        "is not in this config", r.number, r.searcher)
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


def run_study(
    config: StudyConfig,
    *,
    pool_factory: PoolFactory | None = None,
    ray_address: str | None = None,
    progress: bool = True,
    prepared: Prepared | None = None,
) -> RunSummary:
    """Run (or resume) the study described by ``config`` until its budget is spent."""
    start = time.monotonic()
    prepared = prepared or prepare(config)
    config = prepared.config
    storage, study = open_study(prepared)
    pool = None
    bar = None
    try:
        study_id = storage.get_study_id_from_name(config.name)
        me = write_heartbeat(storage, study_id, Launcher.current())
        if other_live_launchers(read_launchers(storage, study_id), me, GRACE_S):
            prepared = _own_seeds(prepared, me)
        recorder = TrialRecorder(storage, config.name, space=prepared.space, settings=config.evaluation,
                                 objectives=config.study.objectives, constraints=config.constraints, run_id=me.run_id)
        records = read_trials(study)
        records, resubmit, stale = resume(prepared, storage, recorder, me, records)
        for searcher in prepared.searchers.values():
            sampler = searcher.sampler()
            if sampler is not None:
                searcher.bind(optuna.load_study(study_name=config.name, storage=storage, sampler=sampler))

        pool = (pool_factory or default_pool)(prepared, ray_address)
        driver = _Driver(prepared, storage, study, pool, recorder, me, records)
        n_trials = config.study.n_trials
        bar = _Progress(n_trials, min(driver.finished, n_trials or driver.finished), config.name, progress)
        # the time budget is for searching: task loading and worker start-up do not count
        deadline = time.monotonic() + config.study.timeout_s if config.study.timeout_s > 0 else None
        _loop(driver, pool, bar, collections.deque(resubmit), deadline)
        left = driver.budget_left()
        if left is not None and left > 0 and (deadline is None or time.monotonic() < deadline):
            log.warning("every searcher finished before the budget: %d trial(s) of %d left", left, n_trials)
        records = read_trials(study)
        summary = RunSummary(
            study_name=config.name,
            storage_url=config.study.storage_url,
            n_trials=config.study.n_trials,
            finished=sum(r.evaluated for r in records),
            new_trials=driver.new_trials,
            evaluations=driver.evaluations,
            cached=driver.cached,
            stale_failed=stale,
            resubmitted=len(resubmit),
            front=pareto_front(records, config.study.directions),
            records=records,
            elapsed_s=time.monotonic() - start,
            driver_s=dict(driver.timers),
        )
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


def _loop(driver: _Driver, pool: Any, bar: _Progress, queue: collections.deque, deadline: float | None) -> None:
    """Fill the pool, collect, record, tell — until the budget or the searchers are spent."""
    capacity = max(1, pool.capacity)
    while True:
        blocked: set[str] = set()
        while len(driver.in_flight) < capacity:
            left = driver.budget_left()
            if (left is not None and left <= 0) or (deadline is not None and time.monotonic() >= deadline):
                break
            if queue:  # proposals of dead launchers go first
                driver.submit(*queue.popleft())
                continue
            label = driver.choose(blocked)
            if label is None:
                break
            t = time.thread_time()
            proposals = driver.searchers[label].ask(1)
            driver.timers["searchers"] += time.thread_time() - t
            if not proposals:
                blocked.add(label)  # waiting for its results; ask the others
                continue
            for proposal in proposals:
                driver.submit(label, proposal)
        if driver.drain(bar):
            continue
        if not driver.in_flight:
            waiting = [n for n in blocked if driver.searchers[n].waiting]
            left = driver.budget_left()
            if waiting and (left is None or left > 0) and (deadline is None or time.monotonic() < deadline):
                time.sleep(POLL_S)  # e.g. a masking run still training: ask again shortly
                driver.heartbeat()
                continue
            return
        # wake up soon when a searcher waits for its own background work
        timeout = 1.0 if any(driver.searchers[n].waiting for n in blocked) else HEARTBEAT_S
        for number, _policy, metrics in pool.results(timeout=timeout):
            driver.arrived[number] = (metrics, None)
        driver.drain(bar)
        driver.heartbeat()
