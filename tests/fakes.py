"""Test doubles for the search service: a tiny task plugin, fake and in-process pools,
a synthetic evaluator and a harness that drives one searcher without the runner.

The synthetic evaluator is a deterministic function of the policy: FLOPs ratio from the
space's analytic cost model, accuracy falling with how much each group is pruned (groups
weighted differently, so there is a real trade-off to search), a small penalty for the
cheap fidelity. It is only for searcher/runner contract tests; end-to-end tests use the
real evaluators.
"""

from __future__ import annotations

import collections
import functools
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch

from evaluators.metrics import Metrics
from search.base import FULL, Proposal, Searcher, SearcherContext, make_searcher
from search.config import ConstraintsSection
from search.recorder import TrialRecorder
from search.records import read_trials
from spaces.policy import Policy
from spaces.space import SearchSpace
from tests.architectures import PlainCNN

DIRECTIONS = ("maximize", "minimize")
# Options that keep a searcher cheap enough for contract tests (masking trains per proposal).
FAST = {"masking": {"steps": 3, "parallel": 1}}
OBJECTIVES = ("accuracy", "flops")


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
    """The EvaluatorPool interface, evaluated synchronously with ``synthetic_metrics``.

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


# -- driving one searcher without the runner --------------------------------------------------
class Harness:
    """An in-memory study + recorder; runs a searcher with the synthetic evaluator."""

    def __init__(self, space: SearchSpace, *, constraints: ConstraintsSection | None = None,
                 storage: Any = None, name: str = "contract") -> None:
        from evaluators.settings import EvalSettings

        self.space = space
        self.settings = EvalSettings()
        self.constraints = constraints or ConstraintsSection(max_flops_ratio=0.6)
        self.storage = storage or optuna.storages.InMemoryStorage()
        self.name = name
        optuna.create_study(storage=self.storage, study_name=name, directions=list(DIRECTIONS), load_if_exists=True)
        self.recorder = TrialRecorder(self.storage, name, space=space, settings=self.settings, objectives=OBJECTIVES,
                                      constraints=self.constraints, run_id="harness")
        self.log: list[tuple[Proposal, Any]] = []

    def context(self, seed: int = 0, label: str = "s") -> SearcherContext:
        return SearcherContext(space=self.space, objectives=OBJECTIVES, directions=DIRECTIONS, settings=self.settings,
                               seed=seed, label=label, constraint_names=self.constraints.names, task=tiny_task(),
                               max_flops_ratio=self.constraints.max_flops_ratio)

    def searcher(self, kind: str, seed: int = 0, options: dict | None = None, label: str = "s") -> Searcher:
        s = make_searcher(kind, self.context(seed, label), {**FAST.get(kind, {}), **(options or {})})
        sampler = s.sampler()
        if sampler is not None:
            s.bind(optuna.load_study(study_name=self.name, storage=self.storage, sampler=sampler))
        return s

    def run(self, searcher: Searcher, n: int, *, window: int = 2, label: str = "s",
            metrics: Callable[[Proposal], Metrics] | None = None) -> list[Proposal]:
        """Ask/evaluate/tell ``n`` proposals, ``window`` in flight, told in order."""
        metrics = metrics or (lambda p: synthetic_metrics(self.space, p.policy, p.settings))
        flight: collections.deque = collections.deque()
        done: list[Proposal] = []
        while len(done) < n:
            want = min(window - len(flight), n - len(done) - len(flight))
            if want > 0:
                for p in searcher.ask(want):
                    flight.append((p, self.recorder.open(label, p)))
            if not flight:
                if searcher.waiting:  # background work of its own (masking runs): poll, as the runner does
                    time.sleep(0.05)
                    continue
                break  # the searcher has nothing to propose
            p, trial = flight.popleft()
            outcome = self.recorder.finish(trial, p, metrics(p))
            searcher.tell(outcome)
            self.log.append((p, trial))
            done.append(p)
        # close what is still open so the study has no RUNNING trial left
        for p, trial in flight:
            outcome = self.recorder.finish(trial, p, metrics(p))
            searcher.tell(outcome)
            self.log.append((p, trial))
            done.append(p)
        return done

    def outcomes(self, label: str = "s") -> list[Any]:
        study = optuna.load_study(study_name=self.name, storage=self.storage)
        return [r.outcome(self.settings, self.constraints.names)
                for r in read_trials(study) if r.searcher == label and r.evaluated]


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
