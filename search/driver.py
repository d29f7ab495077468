"""The driver loop of one launcher: searchers <-> pool <-> recorder.

The loop fills the pool up to its capacity with proposals (searchers picked by their
``share``: the one furthest below its share of trials asks next), records each as one
trial, collects results, records metrics/constraints/values and tells the searcher, until
the budget is spent, the deadline passed or every searcher is out of proposals. With
``[promotion]`` (``search.promotion``) a full-fidelity trial whose proxy is among the best of
its FLOPs level is evaluated again at the next fine-tune rung before it is finished: it
stays in flight (and, ordered, keeps its place) until its last rung. A searcher
whose own background work waits to start for longer than ``STALL_S`` stops the run
(``SearcherStalled``) instead of starving silently.

Each proposal becomes a :class:`Submission` once, at submit: its projection (what is
recorded and evaluated: the watermark's, or ``[fill]``'s growth to a FLOPs level), its
cache key and settings overrides. A proposal of an evaluation already done or under way
shares that result (``search.cache``). With
``ordered`` (one worker), results are processed strictly in submission order, so the same
config and seed give the same sequence of trial params whatever the timing.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from optuna.trial import TrialState

from evaluators.metrics import Metrics
from search.base import FULL, Outcome, Proposal, Searcher
from search.budget import Budget
from search.launchers import HEARTBEAT_S
from search.cache import CacheKey, ResultCache, cache_key
from search.pool import Pool
from search.progress import LiveFront, Progress
from search.promotion import Ladder, PromotionConfig
from search.recorder import TrialRecorder
from search.records import TrialRecord

log = logging.getLogger(__name__)

# How often searchers that wait for their own background work are asked again (seconds).
POLL_S = 0.2
# How long a searcher's background work may wait to start, none of it running (seconds),
# before the run stops with SearcherStalled: Ray worker start-up fits well within it.
STALL_S = 120.0


class SearcherStalled(RuntimeError):
    """A searcher's own background work waited longer than ``STALL_S`` to start."""


def check_stalled(searchers: Mapping[str, Searcher], now: float | None = None) -> None:
    """``SearcherStalled`` naming the first searcher whose background work has waited to start
    (``Searcher.pending_since``) for longer than ``STALL_S``, and what to change."""
    now = time.monotonic() if now is None else now
    for name, searcher in searchers.items():
        since = searcher.pending_since()
        if since is None or now - since <= STALL_S:
            continue
        need = searcher.ray_resources()
        raise SearcherStalled(
            f"searcher {name!r} ({searcher.kind}): its Ray tasks ({need.tasks} x {need.cpus_per_task} CPU) "
            f"waited {now - since:.0f} s to start with none running; give Ray more free CPUs (fewer [study] "
            f"workers or threads_per_worker, or a larger cluster) or lower the searcher's parallel/threads"
        )


@dataclass(frozen=True)
class Plan:
    """What the driver needs to know of the study besides its storage."""

    searchers: Mapping[str, Searcher]   # in config order
    shares: Mapping[str, float]
    directions: tuple[str, ...]
    constraint_names: tuple[str, ...]
    ordered: bool                        # one worker: results processed in submission order
    space: Any = None
    projection: Any = None               # a watermark or a budget fill: every evaluated policy is projected onto it
    latency_table: Any = None            # latency_ms of every trial from the lookup table
    promotion: PromotionConfig | None = None   # fine-tune rungs above the proxy (None: off)


@dataclass(frozen=True)
class Submission:
    """A proposal as submitted: the searcher's own, its marked twin, its trial."""

    label: str
    proposal: Proposal          # what the searcher proposed (and is told about)
    marked: Proposal            # projected (watermark or budget fill): what is recorded and evaluated
    overrides: dict[str, Any]   # evaluation settings that differ from the study's
    key: CacheKey
    trial: Any                  # the RUNNING optuna.trial.Trial

    @property
    def number(self) -> int:
        return self.trial.number


def mark(proposal: Proposal, projection: Any) -> Proposal:
    """``proposal`` projected by ``projection`` (a watermark or a budget fill: anything with
    ``project(policy) -> policy``); the searcher's own policy is kept in
    ``meta["proposal"]`` (what it is told about, and re-proposed on resume)."""
    if projection is None:
        return proposal
    marked = projection.project(proposal.policy)
    if marked == proposal.policy:
        return proposal
    meta = {**dict(proposal.meta), "proposal": proposal.policy.to_json()}
    return dataclasses.replace(proposal, policy=marked, meta=meta)


def bind_searchers(searchers: Mapping[str, Searcher], recorder: TrialRecorder) -> None:
    """Give every sampler-backed searcher the source of its trials."""
    for searcher in searchers.values():
        sampler = searcher.sampler()
        if sampler is not None:
            searcher.bind(recorder.trial_source(sampler))


class Driver:
    """One run's loop state: submissions in flight, arrived results, counters."""

    def __init__(self, plan: Plan, pool: Pool, recorder: TrialRecorder, budget: Budget,
                 records: list[TrialRecord], run_id: str = "", cache: ResultCache | None = None,
                 on_told: Callable[[Outcome], None] | None = None) -> None:
        self.plan = plan
        self.pool = pool
        self.recorder = recorder
        self.budget = budget
        self.run_id = run_id
        self.timers = budget.timers
        self.issued = collections.Counter(r.searcher for r in records)
        self.cache = cache if cache is not None else ResultCache()
        self.live = LiveFront(plan.directions)
        for r in records:
            self.cache.remember(r)
            self.live.add(r)
        self.in_flight: dict[int, Submission] = {}
        self.order: collections.deque[int] = collections.deque()
        self.arrived: dict[int, tuple[Metrics, int | None]] = {}
        self.new_trials = self.evaluations = self.cached = 0
        self.on_told = on_told   # called with every outcome, after its searcher was told
        self.ladder = self._ladder(records)
        self.climbed: dict[int, list[dict[str, Any]]] = {}  # trial -> its finished rungs

    def _ladder(self, records: list[TrialRecord]) -> Ladder | None:
        """The study's promotion ladder, with the rungs of earlier runs' trials counted."""
        promotion = self.plan.promotion
        if promotion is None or not promotion.enabled:
            return None
        ladder = Ladder.for_study(promotion, self.recorder.objectives, self.recorder.constraints)
        for r in records:
            if r.fidelity == FULL and r.metrics is not None:
                ladder.observe_record(r)
        return ladder

    def budget_left(self) -> int | None:
        return self.budget.left(len(self.in_flight))

    # -- proposing -----------------------------------------------------------------------
    def choose(self, blocked: set[str]) -> str | None:
        """The searcher furthest below its share of trials (not blocked, not finished)."""
        best, best_key = None, None
        for i, (name, searcher) in enumerate(self.plan.searchers.items()):
            if name in blocked or searcher.finished:
                continue
            key = ((self.issued[name] + 1) / self.plan.shares[name], i)
            if best_key is None or key < best_key:
                best, best_key = name, key
        return best

    def ask(self, label: str) -> list[Proposal]:
        t = time.thread_time()
        proposals = self.plan.searchers[label].ask(1)
        self.timers["searchers"] += time.thread_time() - t
        return proposals

    def submit(self, label: str, proposal: Proposal) -> None:
        """Record ``proposal`` as a trial and evaluate it (or share an equal evaluation)."""
        marked = mark(proposal, self.plan.projection)
        t = time.thread_time()
        trial = self.recorder.open(label, marked)
        self.timers["storage"] += time.thread_time() - t
        if self.budget.over_budget(trial.number):
            # other launchers took the last places: take this trial back
            self.recorder.fail_over_budget(trial._trial_id, "other launchers filled n_trials first")
            log.info("trial %d: the study's budget was filled by other launchers; stopping", trial.number)
            self.budget.exhausted = True
            return
        overrides = self.recorder.settings_overrides(marked)
        sub = Submission(label, proposal, marked, overrides, cache_key(marked.policy.key(), overrides), trial)
        self.in_flight[sub.number] = sub
        self.order.append(sub.number)
        self.issued[label] += 1
        self.new_trials += 1
        self._start(sub)

    def _rung(self, number: int) -> int:
        """The rung trial ``number`` is on: as many as it finished (0: the proxy)."""
        return len(self.climbed.get(number, ()))

    def _key(self, sub: Submission) -> CacheKey:
        """The cache key of ``sub``'s evaluation at the rung it is on."""
        rung = self._rung(sub.number)
        if rung == 0:
            return sub.key
        return cache_key(sub.marked.policy.key(), {**sub.overrides, **self.ladder.config.overrides(rung)})

    def _settings(self, sub: Submission) -> Any:
        """``sub``'s evaluation settings at the rung it is on (None: the study's)."""
        rung = self._rung(sub.number)
        if rung == 0:
            return sub.proposal.settings
        return (sub.proposal.settings or self.recorder.settings).replace(**self.ladder.config.overrides(rung))

    def _start(self, sub: Submission) -> None:
        """Evaluate ``sub`` at its rung, or share an equal evaluation done or under way."""
        key = self._key(sub)
        hit = self.cache.hit(key)
        if hit is not None:
            self.cached += 1
            self.arrived[sub.number] = (hit[1], hit[0])
        elif not self.cache.follow(key, sub.number):
            self._evaluate(sub)

    def _evaluate(self, sub: Submission) -> None:
        self.evaluations += 1
        self.cache.start(self._key(sub), sub.number)
        self.pool.submit(sub.marked.policy, tag=sub.number, settings=self._settings(sub))

    # -- finishing -----------------------------------------------------------------------
    def _share(self, sub: Submission, metrics: Metrics) -> None:
        """Hand an evaluation's result to the trials waiting for it (or retry one)."""
        shared, retry = self.cache.settle(self._key(sub), sub.number, metrics)
        for follower in shared:
            self.cached += 1
            self.arrived[follower] = (metrics, sub.number)
        if retry is not None:
            self._evaluate(self.in_flight[retry])

    def _with_latency(self, sub: Submission, metrics: Metrics) -> Metrics:
        """Latency from the measured lookup table (cheap, noise-free ranking during search);
        real latency of the Pareto models is measured at export."""
        table = self.plan.latency_table
        if table is None or not metrics.ok:
            return metrics
        from spaces.latency import predict_latency_ms

        ms = predict_latency_ms(table, self.plan.space, sub.marked.policy)
        return dataclasses.replace(metrics, latency_ms=ms, latency_ratio=ms / table.base_ms)

    def _climb(self, sub: Submission, metrics: Metrics) -> bool:
        """Report the rung ``sub`` finished; True if it goes on to the next one."""
        if self.ladder is None or sub.proposal.fidelity != FULL:
            return False
        rung, key = self._rung(sub.number), self._key(sub)   # the rung just finished
        step = self.ladder.step(rung)
        score = self.ladder.score(metrics)
        self.climbed.setdefault(sub.number, []).append(
            {"steps": step, "score": score, "flops_ratio": metrics.flops_ratio, "seconds": metrics.eval_seconds})
        if score is not None:
            self.recorder.report(sub.trial, step, score)
        if not self.ladder.promote(rung, metrics):
            return False
        self.cache.store(key, sub.number, metrics)  # a later equal proposal starts here too
        log.debug("trial %d: promoted to %d fine-tune steps", sub.number, self.ladder.step(rung + 1))
        self._start(sub)
        return True

    def _promotion_attr(self, number: int) -> dict[str, Any] | None:
        """User attr ``promotion`` of a finished trial (None: it never left the proxy)."""
        rungs = self.climbed.pop(number, [])
        rung = len(rungs) - 1   # the last rung it finished
        if rung <= 0:
            return None
        return {"steps": self.ladder.step(rung), "overrides": self.ladder.config.overrides(rung), "rungs": rungs}

    def process(self, number: int, metrics: Metrics, cached_from: int | None, progress: Progress | None) -> bool:
        """Record trial ``number``'s result and tell its searcher; False when the trial was
        promoted to its next rung instead (it stays in flight)."""
        sub = self.in_flight[number]
        self._share(sub, metrics)
        metrics = self._with_latency(sub, metrics)
        if self._climb(sub, metrics):
            return False
        del self.in_flight[number]
        promotion = self._promotion_attr(number)
        t = time.thread_time()
        outcome = self.recorder.finish(sub.trial, sub.proposal, metrics, cached_from=cached_from, promotion=promotion)
        self.timers["storage"] += time.thread_time() - t
        self.budget.finished += 1
        record = TrialRecord(
            number=number, trial_id=sub.trial._trial_id,
            state=TrialState.COMPLETE if outcome.ok else TrialState.FAIL,
            searcher=sub.label, generation=sub.proposal.generation, fidelity=sub.proposal.fidelity,
            policy=sub.marked.policy, metrics=outcome.metrics, values=outcome.values,
            constraints=dict(zip(self.plan.constraint_names, outcome.constraints)), run=self.run_id or None,
            settings=sub.overrides, promotion=promotion or {},
        )
        self.cache.remember(record)
        self.live.add(record)
        t = time.thread_time()
        self.plan.searchers[sub.label].tell(outcome)
        self.timers["searchers"] += time.thread_time() - t
        if self.on_told is not None:
            self.on_told(outcome)
        if progress is not None:
            progress.update(1, self.live)
        return True

    def drain(self, progress: Progress | None) -> bool:
        """Process arrived results; True if any. Ordered: only the oldest, if it arrived."""
        if self.plan.ordered:
            # One at a time, then refill: what a searcher has seen when it is asked next
            # must not depend on how results happened to be batched.
            if not (self.order and self.order[0] in self.arrived):
                return False
            number = self.order.popleft()
            if not self.process(number, *self.arrived.pop(number), progress):
                self.order.appendleft(number)  # promoted: still the oldest
            return True
        done = False
        for number in list(self.arrived):
            metrics, cached_from = self.arrived.pop(number)
            self.order.remove(number)
            if not self.process(number, metrics, cached_from, progress):
                self.order.append(number)
            done = True
        return done


def _may_create(driver: Driver, deadline: float | None) -> bool:
    """Whether the budget and the deadline allow another trial."""
    left = driver.budget_left()
    return (left is None or left > 0) and (deadline is None or time.monotonic() < deadline)


def reserved(driver: Driver, label: str) -> int:
    """Trials kept for the other searchers waiting on their own background work: what they
    still lack of their share of ``n_trials`` (their work is slower than an evaluation, and
    without this the others would spend the whole budget before it arrives)."""
    n_trials = driver.budget.n_trials
    if n_trials is None:
        return 0
    total = sum(driver.plan.shares.values())
    keep = 0
    for name, searcher in driver.plan.searchers.items():
        if name != label and searcher.waiting and not searcher.finished:
            keep += max(0, int(n_trials * driver.plan.shares[name] / total + 1e-9) - driver.issued[name])
    return keep


def fill(driver: Driver, queue: collections.deque, deadline: float | None) -> set[str]:
    """Submit proposals until the pool is full; returns the searchers that had none (or
    whose turn would take trials kept for a waiting searcher: ``reserved``)."""
    blocked: set[str] = set()
    capacity = max(1, driver.pool.capacity)
    while len(driver.in_flight) < capacity and _may_create(driver, deadline):
        if queue:  # proposals of dead launchers go first
            driver.submit(*queue.popleft())
            continue
        label = driver.choose(blocked)
        if label is None:
            break
        left = driver.budget_left()
        if left is not None and left <= reserved(driver, label):
            blocked.add(label)
            continue
        proposals = driver.ask(label)
        if not proposals:
            blocked.add(label)  # waiting for its results; ask the others
            continue
        for proposal in proposals:
            driver.submit(label, proposal)
    return blocked


def run_loop(driver: Driver, queue: collections.deque, deadline: float | None,
             progress: Progress | None = None) -> None:
    """Fill the pool, collect, record, tell — until the budget or the searchers are spent."""
    while True:
        check_stalled(driver.plan.searchers)
        blocked = fill(driver, queue, deadline)
        if driver.drain(progress):
            continue
        waiting = any(driver.plan.searchers[n].waiting for n in blocked)
        if not driver.in_flight:
            if waiting and _may_create(driver, deadline):
                time.sleep(POLL_S)  # e.g. a masking run still training: ask again shortly
                driver.budget.heartbeat()
                continue
            return
        # wake up soon when a searcher waits for its own background work
        for number, _policy, metrics in driver.pool.results(timeout=1.0 if waiting else HEARTBEAT_S):
            driver.arrived[number] = (metrics, None)
        driver.drain(progress)
        driver.budget.heartbeat()
