"""The dynamic-channel-masking searcher: each proposal is the outcome of one masking run.

A run (``search.masking_core.learn_ratios``) trains soft channel masks and per-group ratios
on the task towards one FLOPs target, starting from the allocation of one of option
``starts`` (a heuristic of ``evaluators.heuristics`` at that target: uniform by default)
and training for one of option ``steps`` (one length, or a list of them);
its rounded ratios become a Policy that the runner records and evaluates with the same pool
and recovery as every other searcher, so results are comparable. Runs cycle through
``targets`` x ``lambdas`` x ``starts`` x ``steps`` (then again with the next seed) until the
budget is spent; with ``all_targets`` a run also proposes its learned allocation rescaled to every
other target (one trained run, a policy per target). Each run is a Ray task of ``threads``
CPUs when Ray is initialised (``parallel`` of them at once: ``ray_resources``), else it runs
in-process; a task yields a marker as soon as it starts, so ``pending_since`` tells how long
runs have waited for Ray CPUs with none training. Results are released in run order, so the
sequence of proposals is the same whatever order the tasks finish in.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from search.base import Outcome, Proposal, RayResources, Searcher, SearcherContext, register_searcher
from search.masking_core import (MaskingConfig, MaskingSchedule, check_start, check_target, learn_ratios,
                                 policy_at_target)
from spaces.checks import check_bool, check_int, check_number_list, check_str, check_str_list
from spaces.policy import Policy

log = logging.getLogger(__name__)

STARTED = "started"  # the first item a run's Ray task yields


@dataclass(frozen=True)
class MaskingOptions(MaskingSchedule):
    """Options of the ``masking`` searcher (``[searchers.options]`` in the study TOML): the
    schedule every run shares, which runs to make, and how to run them."""

    steps: int | tuple[int, ...] = 150  # training steps of every run, or a list of lengths, cycled
    targets: tuple[float, ...] = (0.3, 0.5, 0.7)
    lambdas: tuple[float, ...] = (20.0,)
    starts: tuple[str, ...] = ("uniform",)   # initial allocations (heuristics at each run's target), cycled
    method: str | None = None          # ranking criterion; default: the space's first method
    batch_size: int = 64
    parallel: int = 2                  # masking runs in flight at once (Ray tasks)
    threads: int = 1                   # torch threads inside one run
    all_targets: bool = False          # each run also proposes its allocation rescaled to the other targets

    def __post_init__(self) -> None:
        super().__post_init__()
        targets = check_number_list("masking targets", self.targets)
        if not targets:
            raise ValueError("masking needs at least one FLOPs target")
        object.__setattr__(self, "targets", tuple(check_target(t) for t in targets))
        lambdas = check_number_list("masking lambdas", self.lambdas, 0.0)
        if not lambdas:
            raise ValueError("masking needs at least one lambda")
        object.__setattr__(self, "lambdas", lambdas)
        starts = check_str_list("masking starts", self.starts)
        if not starts:
            raise ValueError("masking starts must be a non-empty list of heuristic names, got []")
        object.__setattr__(self, "starts", tuple(check_start(s) for s in starts))
        if self.method is not None:
            check_str("masking method", self.method)
        for key in ("batch_size", "parallel", "threads"):
            check_int(f"masking {key}", getattr(self, key), 1)
        check_bool("masking option all_targets", self.all_targets)

    def _check_steps(self) -> None:
        """``steps``: one length for every run, or a non-empty list of lengths the runs cycle through."""
        lengths = self.steps if isinstance(self.steps, (list, tuple)) else (self.steps,)
        if not lengths:
            raise ValueError("masking steps must be a number of steps or a non-empty list of them, got []")
        object.__setattr__(self, "steps", tuple(check_int("masking steps", n, 1) for n in lengths))

    def schedule(self, **changes: Any) -> MaskingSchedule:
        """One run's schedule: the first of the lengths unless ``changes`` name the steps."""
        return super().schedule(**{"steps": self.steps[0], **changes})

    def config(self, target: float, lam: float, seed: int, method: str = "l1", start: str = "uniform",
               steps: int | None = None) -> MaskingConfig:
        """The run at ``target`` and ``lam`` from ``start`` for ``steps`` (default: the first
        length) steps (criterion: ``method`` unless the options name one)."""
        schedule = self.schedule() if steps is None else self.schedule(steps=steps)
        return MaskingConfig(**vars(schedule), target=target, lam=lam, seed=seed, method=self.method or method,
                             start=start)


def _run(task: Any, space: Any, config: MaskingConfig, batch_size: int, threads: int) -> tuple[str, dict]:
    """One masking run; returns (policy JSON, info). Module-level so Ray can ship it."""
    import torch

    from evaluators.losses import task_distill, task_loss

    torch.set_num_threads(threads)
    model = task.base_model()
    train = task.stream("train", batch_size, seed=config.seed)  # a Dataset split's batches decoded per step
    heldout = task.batches("calibration", batch_size, seed=config.seed)
    policy, info = learn_ratios(model, space, train, heldout, task.example_inputs, config,
                                loss=task_loss(task), distill=task_distill(task))
    return policy.to_json(), info


def _run_streamed(task: Any, space: Any, config: MaskingConfig, batch_size: int, threads: int) -> Iterator[Any]:
    """The Ray task of one run: yields ``STARTED`` as soon as it runs, then the run's result
    (``task`` as ``evaluators.tasks.shipped`` sent it: built here from its spec)."""
    from evaluators.tasks import unshipped

    yield STARTED
    yield _run(unshipped(task), space, config, batch_size, threads)


@dataclass(eq=False)
class _Launched:
    """A launched run: its Ray stream (or, in-process, its result), and how far it got."""

    config: MaskingConfig
    stream: Any = None             # ray ObjectRefGenerator: STARTED, then the result
    result: Any = None             # the result (in-process) or the ObjectRef of it, once finished
    started: bool = False
    launched_at: float = 0.0


@register_searcher("masking")
class MaskingSearcher(Searcher):
    """Dynamic channel masking (Li et al. 2020): learnable ratios under a FLOPs-aware loss."""

    Options = MaskingOptions
    gpus_per_task = 0.0  # Ray num_gpus of each masking run's task

    def __init__(self, context: SearcherContext, options: MaskingOptions | None = None) -> None:
        super().__init__(context, options)
        if getattr(context, "task", None) is None:
            raise ValueError("the masking searcher needs the study's task (training data) in its context")
        self.task = context.task
        self._runs: Iterator[tuple[int, MaskingConfig]] = self._run_stream()
        self._launched: dict[int, _Launched] = {}
        self._last_finish = float("-inf")       # time.monotonic() when a Ray run last finished
        self._done: set[int] = set()            # run indices already proposed (this or a past launch)
        self._next_release = 0
        self._task_ref = None
        self._ready: collections.deque[Proposal] = collections.deque()  # released, not yet asked for

    def _run_stream(self) -> Iterator[tuple[int, MaskingConfig]]:
        options = self.options
        combos = list(itertools.product(options.targets, options.lambdas, options.starts, options.steps))
        for index in itertools.count():
            cycle, pos = divmod(index, len(combos))
            target, lam, start, steps = combos[pos]
            yield index, options.config(target, lam, self.context.seed + cycle, self.space.methods[0], start, steps)

    def _launch(self, index: int, config: MaskingConfig) -> None:
        import ray

        args = (config, self.options.batch_size, self.options.threads)
        if not ray.is_initialized():
            self._launched[index] = _Launched(config, result=_run(self.task, self.space, *args), started=True)
            return
        if self._task_ref is None:
            from evaluators.tasks import shipped

            self._task_ref = ray.put(shipped(self.task))   # the spec and weights, not the data
        # num_gpus: 0 by default, since masking_core trains on the CPU (a GPU share would sit idle)
        remote = ray.remote(num_cpus=self.options.threads, num_gpus=self.gpus_per_task, max_retries=2)(_run_streamed)
        self._launched[index] = _Launched(config, stream=remote.remote(self._task_ref, self.space, *args),
                                          launched_at=time.monotonic())

    def _poll(self) -> None:
        """Note which Ray runs have started and which have finished (never blocks)."""
        import ray

        for run in self._launched.values():
            while run.stream is not None and run.result is None and ray.wait([run.stream], timeout=0)[0]:
                ref = next(run.stream)
                if run.started:  # the second item: the run's result
                    run.result = ref
                    self._last_finish = time.monotonic()
                else:
                    ray.get(ref)  # the marker (raises the task's error if it failed before running)
                    run.started = True

    def ray_resources(self) -> RayResources:
        """``parallel`` training runs of ``threads`` CPUs each."""
        return RayResources(tasks=self.options.parallel, cpus_per_task=self.options.threads)

    def pending_since(self) -> float | None:
        """Since when a launched run has waited to start while no run was training."""
        self._poll()
        runs = self._launched.values()
        waiting = [r.launched_at for r in runs if not r.started]
        if not waiting or any(r.started and r.result is None for r in runs):
            return None
        return max(min(waiting), self._last_finish)

    def ask(self, n: int) -> list[Proposal]:
        import ray

        while len(self._launched) < self.options.parallel:
            index, config = next(self._runs)
            if index in self._done:
                continue
            self._launch(index, config)
        self._poll()
        proposals: list[Proposal] = []
        while len(proposals) < n and self._ready:
            proposals.append(self._ready.popleft())
        while len(proposals) < n and self._next_release in self._launched:
            index = self._next_release
            run = self._launched[index]
            if run.result is None:
                break
            result = ray.get(run.result) if isinstance(run.result, ray.ObjectRef) else run.result
            del self._launched[index]
            self._done.add(index)
            self._next_release += 1
            while self._next_release in self._done and self._next_release not in self._launched:
                self._next_release += 1
            released = self._proposals(index, run.config, *result)
            take = n - len(proposals)
            proposals += released[:take]
            self._ready.extend(released[take:])
        return proposals

    def _proposals(self, index: int, config: MaskingConfig, policy_json: str, info: dict) -> list[Proposal]:
        """The proposals of finished run ``index``: its own policy, then (all_targets) the rescaled ones."""
        meta = {"masking_run": index, "masking_lambda": config.lam, "masking_seed": config.seed,
                "masking_start": config.start, "masking_steps": config.steps,
                "learned_flops_ratio": round(float(info["learned_flops_ratio"]), 6)}
        released = [Proposal(policy=Policy.from_json(policy_json), generation=index,
                             meta={**meta, "masking_target": config.target})]
        if self.options.all_targets:
            released += [Proposal(policy=policy, generation=index,
                                  meta={**meta, "masking_target": target, "masking_learned_at": config.target})
                         for target, policy in self._rescaled(info, config)]
        return released

    def _rescaled(self, info: dict, config: MaskingConfig) -> list[tuple[float, Policy]]:
        """The run's learned allocation moved to each other target by one common factor (the
        way the run's own proposal is made): one trained run, a policy per FLOPs target."""
        return [(t, policy_at_target(self.space, info["learned_ratios"], t, config.method, config.tolerance,
                                     config.snap))
                for t in self.options.targets if t != config.target]

    @property
    def waiting(self) -> bool:
        """True while a launched masking run has not been released as a proposal yet."""
        return bool(self._launched) or bool(self._ready)

    def tell(self, outcome: Outcome) -> None:
        """Masking runs are independent of each other's outcomes: nothing to learn."""

    def rebuild(self, outcomes: Sequence[Outcome], pending: Sequence[Proposal] = ()) -> None:
        for item in list(outcomes) + [p for p in pending]:
            proposal = item.proposal if isinstance(item, Outcome) else item
            run = proposal.meta.get("masking_run") if proposal.meta else None
            if run is not None:
                self._done.add(int(run))
        while self._next_release in self._done:
            self._next_release += 1
