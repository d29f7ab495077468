"""EvaluatorPool: evaluate policies in parallel on Ray actors.

Each actor builds the task itself from its spec (``Task.spec``, set by ``load_task``: name,
options, cache_dir, working directory) with the driver's base weights (one ``ray.put``), so no
dataset goes through the object store; a task built without ``load_task`` (tests) is shipped
whole instead. The actor builds the base model once, fixes its torch threads and runs
:func:`evaluators.evaluate.evaluate`.
The driver keeps up to ``window`` evaluations queued per actor so an actor never idles
between two of them, and watches three failure modes without ever raising:

* the policy fails inside ``evaluate`` -> that Metrics has ``error`` set (evaluate never raises);
* the actor process dies (OOM, SIGKILL, segfault) -> a new actor replaces it and the
  evaluation that was running is retried up to ``max_retries`` times (evaluations only
  queued behind it are resubmitted without being charged a retry);
* an evaluation runs longer than ``timeout_s`` -> ``Metrics.failure("timeout ...")``, its
  actor is killed and replaced, and the evaluations queued behind it are resubmitted.
  The clock of an evaluation starts when the driver sees it become the one its actor
  runs (never before the actor is up), and is checked while ``results()`` waits.

GPUs: with ``gpus_per_worker`` > 0 each actor asks Ray for that many GPUs (``num_gpus``;
0.5 puts two actors on one GPU), Ray makes exactly those visible to it, and the actor keeps
its base model on ``settings.device`` (``"auto"``/``"cuda"``: the GPU Ray gave it).

Works on a local ``ray.init`` and on an existing cluster (``ray_address`` / ``RAY_ADDRESS``);
on a cluster the ``spaces``/``evaluators`` packages must be importable by the workers
(installed, or shipped with ``ray job submit --working-dir``).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from evaluators.metrics import Metrics
from evaluators.ray_cluster import (  # noqa: F401 (check_cluster_cpus, ensure_ray: public here too)
    check_cluster_cpus,
    check_cluster_gpus,
    check_gpus_per_worker,
    ensure_ray,
)
from evaluators.settings import EvalSettings
from evaluators.tasks import Task, TaskSpec
from evaluators.timing import keep_freed_memory
from spaces.checks import check_int, check_number
from spaces.groups import ChannelGroup
from spaces.policy import Policy

log = logging.getLogger(__name__)

_DEFAULT_SETTINGS = EvalSettings()


def _check_timeout(timeout_s: Any) -> None:
    """``timeout_s``: None (no timeout) or a finite number > 0."""
    if timeout_s is not None:
        try:
            check_number("timeout_s", timeout_s, positive=True)
        except ValueError:
            raise ValueError(f"timeout_s must be None or a number > 0, got {timeout_s!r}") from None


def _warn_short(resources: dict, workers: int, threads_per_worker: int, gpus_per_worker: float) -> None:
    """Log when some actors will wait for CPUs or GPUs; ``ValueError`` when none could ever get
    its GPUs (``check_cluster_gpus``)."""
    available = resources.get("CPU", 0)
    if workers * threads_per_worker > available:
        log.warning(
            "pool asks for %d CPUs (%d workers x %d threads) but the Ray cluster has %g; "
            "some workers will wait for resources", workers * threads_per_worker, workers, threads_per_worker, available,
        )
    short = check_cluster_gpus(float(resources.get("GPU", 0)), workers, gpus_per_worker)
    if short:
        log.warning(short)


class EvalWorker:
    """Body of one Ray actor: the task and base model live here for the actor's lifetime."""

    def __init__(self, task: Task | TaskSpec, groups: Sequence[ChannelGroup], round_to: int, threads: int,
                 base_cost: Any, base_state: dict | None = None, samples: dict[str, int] | None = None):
        import torch

        # Fixed threads per actor: several actors on one machine must not oversubscribe cores.
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set in this process
            pass
        keep_freed_memory()  # no mmap/munmap of activations per forward: less kernel time, steadier timings
        self.task = task if isinstance(task, Task) else task.load(base_state, samples)
        self.groups = list(groups)
        self.round_to = round_to
        self.base = self.task.base_model()
        self.base_cost = base_cost

    def pid(self) -> int:
        return os.getpid()

    def gpu_ids(self) -> list:
        """The GPU ids Ray gave this actor (empty without ``num_gpus``)."""
        import ray

        return list(ray.get_gpu_ids())

    def evaluate(self, policy: Policy, settings: EvalSettings) -> Metrics:
        from evaluators.devices import resolve_device
        from evaluators.evaluate import evaluate

        try:  # the base model moves to the evaluation's device once, not per evaluation
            self.base.to(resolve_device(settings.device))
        except ValueError:  # no such device here: evaluate() reports it as this policy's failure
            pass
        return evaluate(
            policy, self.task, settings, groups=self.groups, round_to=self.round_to,
            base_model=self.base, base_cost=self.base_cost,
        )


@functools.lru_cache(maxsize=1)
def _remote_worker_class():
    import ray

    return ray.remote(EvalWorker)


@dataclass(eq=False)
class _Job:
    tag: Any
    policy: Policy
    settings: EvalSettings
    retries: int = 0
    ref: Any = None
    started: float | None = None  # when the driver saw it become the running one on its actor


@dataclass(eq=False)
class _Slot:
    index: int
    actor: Any
    pid_ref: Any
    ready: bool = False
    jobs: collections.deque = field(default_factory=collections.deque)  # in submission (= run) order


class EvaluatorPool:
    """Ray actors evaluating policies; ``submit`` then collect with ``results``. A local Ray it
    starts gets ``ray_cpus`` CPUs (default ``workers * threads_per_worker``; more leaves room
    for the run's other Ray tasks, e.g. a searcher's training runs) and ``ray_gpus`` GPUs
    when given. Each actor asks for ``gpus_per_worker`` GPUs (default 0)."""

    def __init__(
        self,
        task: Task,
        *,
        groups: Sequence[ChannelGroup],
        round_to: int = 1,
        settings: EvalSettings = _DEFAULT_SETTINGS,
        workers: int = 1,
        threads_per_worker: int = 1,
        timeout_s: float | None = None,
        max_retries: int = 2,
        window: int = 2,
        ray_address: str | None = None,
        ray_cpus: int | None = None,
        gpus_per_worker: float = 0.0,
        ray_gpus: int | None = None,
    ):
        if not isinstance(task, Task):
            raise ValueError(f"task must be an evaluators.tasks.Task, got {type(task).__name__}")
        groups = tuple(groups)
        if not groups or not all(isinstance(g, ChannelGroup) for g in groups):
            raise ValueError("groups must be a non-empty sequence of ChannelGroup (use space.groups)")
        check_int("workers", workers, 1)
        check_int("threads_per_worker", threads_per_worker, 1)
        check_int("round_to", round_to, 1)
        check_int("window", window, 1)
        check_int("max_retries", max_retries, 0)
        _check_timeout(timeout_s)
        self.gpus_per_worker = check_gpus_per_worker("gpus_per_worker", gpus_per_worker)
        if not isinstance(settings, EvalSettings):
            raise ValueError(f"settings must be EvalSettings, got {type(settings).__name__}")

        import ray

        from evaluators.measure import model_cost

        ensure_ray(ray_address, ray_cpus if ray_cpus is not None else workers * threads_per_worker, ray_gpus)
        self._ray = ray
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.window = window
        self.timeout_s = float(timeout_s) if timeout_s is not None else None
        self.max_retries = max_retries
        self.settings = settings
        self.restarts = 0
        _warn_short(ray.cluster_resources(), workers, threads_per_worker, self.gpus_per_worker)
        # Put once, read by every (re)started actor: the task's spec, base weights and sample
        # counts, which the actor builds its task from (a task not from load_task: the whole task).
        self._task_args = ((ray.put(task.spec), ray.put(dict(task.base_state)), task.sample_counts())
                           if task.spec is not None else (ray.put(task), None, None))
        self._groups_ref = ray.put(groups)
        self._round_to = round_to
        self._base_cost = model_cost(task.base_model(), task.example_inputs)
        self._pending: collections.deque[_Job] = collections.deque()
        self._running: dict[Any, tuple[_Job, _Slot]] = {}
        self._done: list[tuple[Any, Policy, Metrics]] = []
        self._closed = False
        self._slots = [self._new_slot(i) for i in range(workers)]

    # -- actors ---------------------------------------------------------------------------
    def _new_slot(self, index: int) -> _Slot:
        actor = _remote_worker_class().options(
            num_cpus=self.threads_per_worker, num_gpus=self.gpus_per_worker, max_restarts=0, max_concurrency=1
        ).remote(self._task_args[0], self._groups_ref, self._round_to, self.threads_per_worker, self._base_cost,
                 *self._task_args[1:])
        # Asked first, so it is answered as soon as the actor is up (ahead of evaluations).
        return _Slot(index=index, actor=actor, pid_ref=actor.pid.remote())

    def _replace_actor(self, slot: _Slot, reason: str) -> list[_Job]:
        """Kill ``slot``'s actor, start a new one; return the jobs it held, in run order."""
        jobs = list(slot.jobs)
        for job in jobs:
            self._running.pop(job.ref, None)
        try:
            self._ray.kill(slot.actor, no_restart=True)
        except Exception:  # already dead
            pass
        self.restarts += 1
        log.warning("worker %d replaced: %s", slot.index, reason)
        new = self._new_slot(slot.index)
        self._slots[slot.index] = new
        return jobs

    def worker_pids(self) -> list[int]:
        """Process ids of the current actors (waits until they have started)."""
        self._check_open()
        return [int(pid) for pid in self._ray.get([s.pid_ref for s in self._slots])]

    def worker_gpu_ids(self) -> list[list]:
        """The GPU ids Ray gave each current actor, in worker order (waits until they started)."""
        self._check_open()
        return [list(ids) for ids in self._ray.get([s.actor.gpu_ids.remote() for s in self._slots])]

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every actor has started (useful before timing); ``TimeoutError`` after ``timeout`` s."""
        self._check_open()
        try:
            self._ray.get([s.pid_ref for s in self._slots], timeout=timeout)
        except self._ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"EvaluatorPool workers not started after {timeout} s (does the Ray cluster have "
                f"{self.workers * self.threads_per_worker} free CPUs?)"
            ) from None

    # -- submission -----------------------------------------------------------------------
    def submit(self, policy: Policy, tag: Any = None, settings: EvalSettings | None = None) -> None:
        """Queue ``policy`` for evaluation; ``tag`` comes back with its result."""
        self._check_open()
        if not isinstance(policy, Policy):
            raise ValueError(f"submit expects a Policy, got {type(policy).__name__}")
        settings = self.settings if settings is None else settings
        if not isinstance(settings, EvalSettings):
            raise ValueError(f"settings must be EvalSettings, got {type(settings).__name__}")
        if settings.threads != self.threads_per_worker:
            settings = settings.replace(threads=self.threads_per_worker)
        self._pending.append(_Job(tag=tag, policy=policy, settings=settings))
        self._dispatch()

    def _dispatch(self) -> None:
        now = time.monotonic()
        while self._pending:
            open_slots = [s for s in self._slots if len(s.jobs) < self.window]
            if not open_slots:
                return
            slot = min(open_slots, key=lambda s: (len(s.jobs), s.index))
            job = self._pending.popleft()
            job.ref = slot.actor.evaluate.remote(job.policy, job.settings)
            job.started = now if not slot.jobs and slot.ready else None
            slot.jobs.append(job)
            self._running[job.ref] = (job, slot)

    @property
    def in_flight(self) -> int:
        """Submitted and not yet returned by ``results()``."""
        return len(self._pending) + len(self._running) + len(self._done)

    @property
    def capacity(self) -> int:
        """How many evaluations may usefully be in flight: ``workers * window``."""
        return self.workers * self.window

    # -- collection -----------------------------------------------------------------------
    def results(self, timeout: float | None = None) -> list[tuple[Any, Policy, Metrics]]:
        """Every finished ``(tag, policy, metrics)``; blocks until at least one finished.

        Returns ``[]`` when nothing is in flight or ``timeout`` seconds passed first.
        """
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            self._dispatch()
            if self._done:
                out, self._done = self._done, []
                return out
            if not self._running:
                return []
            now = time.monotonic()
            wait = None if deadline is None else max(0.0, deadline - now)
            if self.timeout_s is not None:
                # Wake up for the next per-evaluation deadline (and to notice actors starting).
                heads = [s.jobs[0].started for s in self._slots if s.jobs and s.jobs[0].started is not None]
                next_due = min((t + self.timeout_s - now for t in heads), default=0.5)
                wait = min(wait if wait is not None else 1.0, max(0.01, min(next_due, 1.0)))
            refs = list(self._running)
            ready, rest = self._ray.wait(refs, num_returns=1, timeout=wait)
            if ready and rest:
                ready += self._ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                self._collect(ref)
            self._check_timeouts()
            if deadline is not None and time.monotonic() >= deadline and not self._done:
                self._dispatch()
                return []

    def _collect(self, ref: Any) -> None:
        entry = self._running.pop(ref, None)
        if entry is None:  # belonged to an actor already replaced
            return
        job, slot = entry
        ray_exc = self._ray.exceptions
        try:
            metrics = self._ray.get(ref)
        except (ray_exc.RayActorError, ray_exc.WorkerCrashedError, ray_exc.ObjectLostError) as exc:
            self._running[ref] = entry  # let _worker_died see every job of the slot
            self._worker_died(slot, exc)
            return
        except ray_exc.RayTaskError as exc:  # evaluate never raises; this is e.g. a pickling error
            metrics = Metrics.failure(exc.cause if exc.cause is not None else exc, fidelity=job.settings.fidelity)
        except Exception as exc:
            metrics = Metrics.failure(exc, fidelity=job.settings.fidelity)
        if not isinstance(metrics, Metrics):
            metrics = Metrics.failure(f"worker returned {type(metrics).__name__}, not Metrics", fidelity=job.settings.fidelity)
        self._finish(job, slot, metrics)

    def _finish(self, job: _Job, slot: _Slot, metrics: Metrics) -> None:
        try:
            slot.jobs.remove(job)
        except ValueError:
            pass
        if slot.jobs and slot.jobs[0].started is None and slot.ready:
            slot.jobs[0].started = time.monotonic()
        self._done.append((job.tag, job.policy, metrics))

    def _salvage(self, jobs: list[_Job]) -> list[_Job]:
        """Finish the jobs of a dead actor whose results did arrive; return the lost ones."""
        lost = []
        for job in jobs:
            ready, _ = self._ray.wait([job.ref], num_returns=1, timeout=0)
            if ready:
                try:
                    metrics = self._ray.get(job.ref)
                except Exception:
                    metrics = None
                if isinstance(metrics, Metrics):
                    self._done.append((job.tag, job.policy, metrics))
                    continue
            lost.append(job)
        return lost

    def _worker_died(self, slot: _Slot, exc: BaseException) -> None:
        reason = " ".join(str(exc).split())[:200]
        lost = self._salvage(self._replace_actor(slot, f"actor died ({type(exc).__name__}: {reason})"))
        if not lost:
            return
        # The actor runs its queue in order, so the first lost job is the one it was running.
        running, queued = lost[0], lost[1:]
        running.retries += 1
        requeue = queued
        if running.retries > self.max_retries:
            self._done.append((running.tag, running.policy, Metrics.failure(
                f"worker died {running.retries} times while evaluating this policy: {type(exc).__name__}: {reason}",
                fidelity=running.settings.fidelity,
            )))
        else:
            requeue = [running, *queued]
        for job in reversed(requeue):
            job.ref, job.started = None, None
            self._pending.appendleft(job)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for slot in list(self._slots):
            if not slot.ready:
                if not self._ray.wait([slot.pid_ref], num_returns=1, timeout=0)[0]:
                    continue
                slot.ready = True  # the timeout clock starts once the actor is up
                if slot.jobs and slot.jobs[0].started is None:
                    slot.jobs[0].started = now
            if self.timeout_s is None or not slot.jobs:
                continue
            head = slot.jobs[0]
            if head.started is None or now - head.started <= self.timeout_s:
                continue
            if self._ray.wait([head.ref], num_returns=1, timeout=0)[0]:
                continue  # finished (or died) just now; collected on the next pass
            jobs = self._replace_actor(slot, f"evaluation exceeded timeout of {self.timeout_s:g} s")
            head_job, queued = jobs[0], jobs[1:]
            self._done.append((head_job.tag, head_job.policy, Metrics.failure(
                f"timeout after {self.timeout_s:g} s (worker killed and replaced)",
                eval_seconds=now - head.started, fidelity=head_job.settings.fidelity,
            )))
            for job in reversed(queued):
                job.ref, job.started = None, None
                self._pending.appendleft(job)

    # -- lifetime -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this EvaluatorPool is closed")

    def close(self) -> None:
        """Kill the actors; pending evaluations are dropped. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            try:
                self._ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass
        self._pending.clear()
        self._running.clear()
        self._done.clear()

    def __enter__(self) -> "EvaluatorPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
