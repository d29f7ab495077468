"""Test doubles for the search service: a tiny task plugin, fake and in-process pools,
a synthetic evaluator and a harness that drives searchers through the real driver.

The synthetic evaluator is a deterministic function of the policy: FLOPs ratio from the
space's analytic cost model, accuracy falling with how much each group is pruned (groups
weighted differently, so there is a real trade-off to search), a small penalty for the
cheap fidelity. It is only for searcher/runner contract tests; end-to-end tests use the
real evaluators.
"""

from __future__ import annotations

import collections
import functools
import math
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch

from evaluators.metrics import Metrics
from evaluators.settings import EvalSettings
from search.base import FULL, Proposal, Searcher, SearcherContext, make_searcher
from search.config import ConstraintsSection
from search.budget import Budget
from search.cache import ResultCache
from search.driver import Driver, Plan, bind_searchers, run_loop
from search.launchers import Launcher, write_heartbeat
from search.recorder import TrialRecorder
from search.records import read_trials
from spaces.policy import Policy
from spaces.space import SearchSpace
from tests.architectures import PlainCNN

DIRECTIONS = ("maximize", "minimize")
# Options that keep a searcher cheap enough for contract tests (masking trains per proposal).
FAST = {"masking": {"steps": 3, "parallel": 1}}
OBJECTIVES = ("accuracy", "flops")
# Evaluation settings small enough for tests on the real digits task.
FAST_EVAL = EvalSettings(calibration_samples=128, bn_batches=2, eval_samples=200)


# -- a tiny task plugin ("tests.fakes:tiny_task"): untrained PlainCNN, random data -----------
def _build_plain(num_classes: int = 10) -> torch.nn.Module:
    return PlainCNN(num_classes=num_classes)


def tiny_task(seed: int = 0, samples: int = 64) -> Any:
    """A Task that costs nothing to build: random 3x16x16 data, an untrained PlainCNN."""
    from evaluators.tasks import Task

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _build_plain()
    x = torch.randn(3 * samples, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (3 * samples,), generator=gen)
    return Task(
        name="tiny",
        build_model=functools.partial(_build_plain, 10),
        train=(x[:samples], y[:samples]),
        calibration=(x[samples : 2 * samples], y[samples : 2 * samples]),
        validation=(x[2 * samples :], y[2 * samples :]),
        example_inputs=x[:1].clone(),
        num_classes=10,
        base_state={k: v.clone() for k, v in model.state_dict().items()},
        config={"seed": seed, "samples": samples},
    )


def broken_task(**options: Any) -> Any:
    """A task plugin that fails at run time (not bad input): for exit-code-1 tests."""
    raise RuntimeError("simulated failure while building the task")


@functools.lru_cache(maxsize=4)
def tiny_space(ratio_min: float = 0.2, ratio_step: float = 0.1, methods: tuple[str, ...] = ("l1",)) -> SearchSpace:
    task = tiny_task()
    return SearchSpace.from_model(task.base_model(), task.example_inputs, ratio_min=ratio_min,
                                  ratio_step=ratio_step, methods=methods)


# -- synthetic evaluation ---------------------------------------------------------------------
def synthetic_metrics(space: SearchSpace, policy: Policy, settings: Any = None) -> Metrics:
    fidelity = settings.fidelity if settings is not None else FULL
    cost = space.predict_cost(policy)
    base = space.base_cost
    weights = [0.05 + 0.1 * i for i in range(len(space.groups))]
    loss = sum(w * (1.0 - policy.ratio(g.name)) ** 2 for w, g in zip(weights, space.groups))
    accuracy = max(0.0, 0.99 - loss - (0.02 if fidelity != FULL else 0.0))
    return Metrics(accuracy=accuracy, flops=cost.flops, params=cost.params, flops_ratio=cost.flops / base.flops,
                   params_ratio=cost.params / base.params, eval_seconds=0.001, fidelity=fidelity)


class FakePool:
    """A ``search.pool.Pool``, evaluated synchronously with ``synthetic_metrics``.

    ``fail_when(policy)`` makes an evaluation fail (Metrics.failure); ``crash_after`` raises
    from ``results`` once that many results were returned (a launcher dying mid-run).
    """

    def __init__(self, space: SearchSpace, *, workers: int = 1, window: int = 2,
                 fail_when: Callable[[Policy], bool] | None = None, crash_after: int | None = None,
                 evaluate: Callable[..., Metrics] | None = None) -> None:
        self.space = space
        self.workers, self.window = workers, window
        self.fail_when = fail_when
        self.crash_after = crash_after
        self._evaluate = evaluate or (lambda policy, settings: synthetic_metrics(space, policy, settings))
        self._queue: collections.deque = collections.deque()
        self.evaluated: list[tuple[str, str]] = []   # (policy key, fidelity) of every evaluation
        self.returned = 0
        self.closed = False

    def submit(self, policy: Policy, tag: Any = None, settings: Any = None) -> None:
        assert not self.closed
        self._queue.append((tag, policy, settings))

    def results(self, timeout: float | None = None) -> list[tuple[Any, Policy, Metrics]]:
        if self.crash_after is not None and self.returned >= self.crash_after:
            raise RuntimeError("simulated launcher crash")
        if not self._queue:
            return []
        tag, policy, settings = self._queue.popleft()
        fidelity = settings.fidelity if settings is not None else FULL
        self.evaluated.append((policy.key(), fidelity))
        if self.fail_when is not None and self.fail_when(policy):
            metrics = Metrics.failure("synthetic failure", fidelity=fidelity)
        else:
            metrics = self._evaluate(policy, settings)
        self.returned += 1
        return [(tag, policy, metrics)]

    @property
    def in_flight(self) -> int:
        return len(self._queue)

    @property
    def capacity(self) -> int:
        return self.workers * self.window

    def worker_pids(self) -> list[int]:
        return []

    def close(self) -> None:
        self.closed = True


def local_pool(task: Any, space: SearchSpace, settings: Any, **kwargs: Any) -> FakePool:
    """A FakePool whose evaluations are the real in-process ``evaluators.evaluate``."""
    from evaluators.evaluate import evaluate

    base = task.base_model()

    def run(policy: Policy, s: Any) -> Metrics:
        return evaluate(policy, task, s or settings, groups=space.groups, round_to=space.round_to, base_model=base)

    return FakePool(space, evaluate=run, **kwargs)


# -- driving searchers through the real driver -----------------------------------------------
class CountingMark:
    """A stand-in watermark (``project`` is all the driver uses): rounds every ratio up to a
    multiple of 0.2 and counts its projections."""

    def __init__(self) -> None:
        self.calls = 0

    def project(self, policy: Policy) -> Policy:
        self.calls += 1
        ratios = {g: min(1.0, math.ceil(r * 5 - 1e-9) / 5) for g, r in policy.ratios.items()}
        return Policy(ratios=ratios, method=policy.method)


class EvaluateEveryTrial(ResultCache):
    """A result cache that never shares: every trial is evaluated (tests that count evaluations)."""

    def hit(self, key: Any) -> None:
        return None

    def follow(self, key: Any, number: int) -> bool:
        return False


class Harness:
    """An in-memory study driven by the real ``search.driver`` with a fake pool.

    Searchers go through the driver's cache, projection and budget paths exactly as in a
    run; only the evaluation is synthetic (or ``metrics``) and the storage in memory.
    ``share_results=False`` evaluates every trial, duplicates included.
    """

    def __init__(self, space: SearchSpace, *, constraints: ConstraintsSection | None = None,
                 storage: Any = None, name: str = "contract", projection: Any = None,
                 share_results: bool = True, promotion: Any = None) -> None:
        from evaluators.settings import EvalSettings

        self.space = space
        self.settings = EvalSettings()
        self.constraints = constraints or ConstraintsSection(max_flops_ratio=0.6)
        self.storage = storage or optuna.storages.InMemoryStorage()
        self.name = name
        self.projection = projection   # a watermark or a budget fill
        self.share_results = share_results
        self.promotion = promotion   # a search.promotion.PromotionConfig, or None
        optuna.create_study(storage=self.storage, study_name=name, directions=list(DIRECTIONS), load_if_exists=True)
        self.recorder = TrialRecorder(self.storage, name, space=space, settings=self.settings, objectives=OBJECTIVES,
                                      constraints=self.constraints, run_id="harness")
        self.me = write_heartbeat(self.storage, self.recorder.study_id, Launcher.current())
        self.log: list[tuple[Proposal, Any]] = []   # (the searcher's proposal, its outcome) as told

    def context(self, seed: int = 0, label: str = "s") -> SearcherContext:
        return SearcherContext(space=self.space, objectives=OBJECTIVES, directions=DIRECTIONS, settings=self.settings,
                               seed=seed, label=label, constraint_names=self.constraints.names, task=tiny_task(),
                               max_flops_ratio=self.constraints.max_flops_ratio)

    def searcher(self, kind: str, seed: int = 0, options: dict | None = None, label: str = "s") -> Searcher:
        s = make_searcher(kind, self.context(seed, label), {**FAST.get(kind, {}), **(options or {})})
        bind_searchers({label: s}, self.recorder)
        return s

    def run(self, searcher: Searcher, n: int, *, window: int = 2, label: str = "s",
            metrics: Callable[[Proposal], Metrics] | None = None) -> list[Proposal]:
        """Drive ``n`` more trials of ``searcher``, ``window`` in flight, told in order;
        returns the searcher's proposals in the order they were told."""
        metrics = metrics or (lambda p: synthetic_metrics(self.space, p.policy, p.settings))
        pool = FakePool(self.space, workers=1, window=window,
                        evaluate=lambda policy, settings: metrics(Proposal(policy, settings=settings)))
        records = self.records()
        finished = sum(r.evaluated for r in records)
        budget = Budget(finished + n, finished, self.storage, self.recorder.study_id, self.me)
        plan = Plan(searchers={label: searcher}, shares={label: 1.0}, directions=DIRECTIONS,
                    constraint_names=self.constraints.names, ordered=True, space=self.space,
                    projection=self.projection, promotion=self.promotion)
        cache = None if self.share_results else EvaluateEveryTrial()
        told: list[Any] = []
        driver = Driver(plan, pool, self.recorder, budget, records, self.me.run_id, cache=cache,
                        on_told=told.append)
        run_loop(driver, collections.deque(), deadline=None)
        self.log.extend((o.proposal, o) for o in told)
        return [o.proposal for o in told]

    def records(self) -> list[Any]:
        return read_trials(optuna.load_study(study_name=self.name, storage=self.storage))

    def outcomes(self, label: str = "s") -> list[Any]:
        return [r.outcome(self.settings, self.constraints.names)
                for r in self.records() if r.searcher == label and r.evaluated]


# -- config files -----------------------------------------------------------------------------
def write_config(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def tiny_config(tmp_path: Path, *, name: str = "tiny", n_trials: int = 12, searchers: str | None = None,
                extra: str = "", constraints: str = "max_flops_ratio = 0.7", space: str = "",
                journal: bool = False) -> Path:
    """A study TOML on the tiny task with storage, cache and exports under ``tmp_path``.

    ``journal``: an Optuna journal file instead of SQLite (several times cheaper per trial).
    """
    storage = f"{tmp_path}/{name}.journal" if journal else f"sqlite:///{tmp_path}/{name}.db"
    searchers = searchers if searchers is not None else """
        [[searchers]]
        kind = "random"
        """
    text = f"""
        [study]
        name = "{name}"
        storage = "{storage}"
        n_trials = {n_trials}
        seed = 0
        log_file = "{tmp_path}/{name}.log"

        [task]
        name = "tests.fakes:tiny_task"
        cache_dir = "{tmp_path}/cache"

        [space]
        ratio_min = 0.2
        ratio_step = 0.1
        {space}

        [evaluation]
        calibration_samples = 32
        bn_batches = 2
        batch_size = 32

        [constraints]
        {constraints}

        [export]
        dir = "{tmp_path}/exports"
        {extra}
        """
    text = textwrap.dedent(text) + textwrap.dedent(searchers)
    return write_config(tmp_path / f"{name}.toml", text)
