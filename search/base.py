"""Searcher: the small ABC every policy proposer implements, and its registry.

A searcher proposes policies and learns from their outcomes; it never touches storage or
workers. The driver (``search.driver``) owns the evaluator pool and, through
``search.recorder``, every write to the Optuna study:

* ``ask(n)`` returns up to ``n`` :class:`Proposal` objects — possibly fewer, even none,
  when the searcher is waiting for results (a GA generation barrier, a masking task that
  has not finished training). Every proposal becomes exactly one Optuna trial.
* ``tell(outcome)`` reports the :class:`Outcome` of one of its proposals (in the order the
  driver finishes them; with one worker that is the order they were asked).
* ``rebuild(outcomes, pending)`` restores the searcher's state from the finished trials of
  a resumed study, before any ``ask``. ``pending`` are proposals of a dead launcher that
  the driver re-submits first; their outcomes will be told later, so the searcher must not
  propose them again.

A proposal carries its own evaluation settings when it wants a different fidelity than the
study's (``settings``: e.g. the GA's cheap adaptive-BN step, ``fidelity="cheap"``); ``None``
means the study's ``[evaluation]`` settings (fidelity ``"full"``).

Trials are created by the recorder only. A searcher backed by an Optuna sampler returns it
from ``sampler()``; the driver then ``bind``s it to a ``search.recorder.TrialSource`` over
that sampler. In ``ask`` it takes a trial from the source (the sampler picks the params),
turns the params into its policy and puts the trial in ``Proposal.trial``; the recorder
writes the proposal's attrs on that trial. For every other proposal the recorder creates a
trial with exactly the proposed params.

A searcher whose own background work runs as Ray tasks (masking's training runs) declares
the CPUs that work holds at once with ``ray_resources()``; the study's Ray set-up
(``search.setup.start_ray``) adds them to the evaluation workers' CPUs, and ``pending_since()``
lets the driver stop a run whose background work never starts (``search.driver.STALL_S``).

Register a searcher with ``@register_searcher("name")``; its options are a frozen
dataclass ``Options`` (unknown keys are errors) built from the ``[searchers.options]``
TOML table.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from evaluators.metrics import MAXIMIZE, MINIMIZE, Metrics
from spaces.checks import check_int
from spaces.policy import Policy
from spaces.registry import Registry
from spaces.space import SearchSpace

if TYPE_CHECKING:
    import optuna

    from evaluators.settings import EvalSettings
    from search.recorder import SampledTrial, TrialSource

FULL = "full"


@dataclass(frozen=True)
class Proposal:
    """One policy to evaluate, as a searcher proposes it.

    ``generation`` is the searcher's round (GA generation; -1 for a sensitivity pass).
    ``settings`` overrides the study's evaluation settings for this proposal (its
    ``fidelity`` is recorded); ``meta`` holds extra JSON-able user attrs. ``trial`` is the
    trial the searcher's sampler filled in (from its ``TrialSource``), if any.
    """

    policy: Policy
    generation: int = 0
    settings: EvalSettings | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    trial: SampledTrial | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.policy, Policy):
            raise ValueError(f"a proposal needs a Policy, got {type(self.policy).__name__}")
        check_int("generation", self.generation)

    @property
    def fidelity(self) -> str:
        return self.settings.fidelity if self.settings is not None else FULL

    def key(self) -> tuple[str, str]:
        """What makes two proposals the same evaluation: policy and fidelity."""
        return (self.policy.key(), self.fidelity)


@dataclass(frozen=True)
class Outcome:
    """What came of a proposal: its metrics, objective values and constraint values.

    ``values`` follow the study's objectives (``None`` when the evaluation failed);
    ``constraints`` follow the study's constraints, Optuna's convention (<= 0 feasible).
    """

    proposal: Proposal
    metrics: Metrics
    values: tuple[float, ...] | None
    constraints: tuple[float, ...] = ()
    number: int | None = None

    @property
    def ok(self) -> bool:
        return self.values is not None

    @property
    def violation(self) -> float:
        """Total constraint violation (0 when feasible, inf when the evaluation failed)."""
        if self.values is None:
            return math.inf
        return float(sum(c for c in self.constraints if c > 0))

    @property
    def feasible(self) -> bool:
        return self.ok and self.violation == 0.0


@dataclass(frozen=True)
class SearcherContext:
    """What a searcher may know about the study it proposes for."""

    space: SearchSpace
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    settings: EvalSettings
    seed: int = 0
    label: str = ""
    constraint_names: tuple[str, ...] = ()
    #: the study's FLOPs budget ([constraints] max_flops_ratio), where start points are placed
    max_flops_ratio: float | None = None
    #: the study's Task (model factory + data), for searchers that train (masking); may be None
    task: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.objectives) != len(self.directions) or not self.objectives:
            raise ValueError("objectives and directions must be non-empty and of equal length")
        bad = [d for d in self.directions if d not in (MAXIMIZE, MINIMIZE)]
        if bad:
            raise ValueError(f"unknown direction {bad[0]!r} (use 'maximize' or 'minimize')")


@dataclass(frozen=True)
class RayResources:
    """The Ray tasks a searcher's own background work keeps in flight at once."""

    tasks: int = 0          # tasks in flight at once
    cpus_per_task: int = 1  # Ray ``num_cpus`` of each

    def __post_init__(self) -> None:
        check_int("tasks", self.tasks, 0)
        check_int("cpus_per_task", self.cpus_per_task, 1)

    @property
    def cpus(self) -> int:
        """CPUs the work holds at once."""
        return self.tasks * self.cpus_per_task


@dataclass(frozen=True)
class NoOptions:
    """Options of a searcher that takes none."""


class Searcher(abc.ABC):
    """Proposes policies of ``context.space`` and learns from their outcomes."""

    #: registry name, set by ``register_searcher``
    kind: ClassVar[str] = ""
    #: the searcher's options dataclass (frozen, validated in ``__post_init__``)
    Options: ClassVar[type] = NoOptions
    #: True when ``rebuild`` restores exactly the state an uninterrupted run would have
    #: (same seed and outcomes -> the same next proposals); samplers that only re-read the
    #: study restart their RNG from a derived seed instead.
    resume_exact: ClassVar[bool] = False

    def __init__(self, context: SearcherContext, options: Any = None) -> None:
        self.context = context
        self.space = context.space
        self.options = options if options is not None else self.Options()

    # -- optional hooks ----------------------------------------------------------------------
    def sampler(self) -> optuna.samplers.BaseSampler | None:
        """The Optuna sampler this searcher drives, or ``None`` when it fixes params itself.

        When not ``None`` the driver binds the searcher to a trial source over this sampler
        (``bind``) and the searcher takes its trials from it.
        """
        return None

    def bind(self, trials: TrialSource) -> None:
        """Called once with the source of this searcher's trials (only if ``sampler()``)."""
        self.trials = trials

    def rebuild(self, outcomes: Sequence[Outcome], pending: Sequence[Proposal] = ()) -> None:
        """Restore state from this searcher's finished trials (in trial order).

        The default tells every outcome in order; ``pending`` proposals are re-submitted by
        the driver and told later.
        """
        for outcome in outcomes:
            self.tell(outcome)

    @property
    def finished(self) -> bool:
        """True when the searcher will never propose anything again."""
        return False

    @property
    def waiting(self) -> bool:
        """True while work of its own (not an outcome) will give it proposals later.

        A searcher that returns nothing from ``ask`` while nothing of its own is being
        evaluated either waits for such work (e.g. a background training task: override
        this to return True meanwhile, and the driver polls it) or is out of proposals.
        """
        return False

    def ray_resources(self) -> RayResources:
        """The Ray tasks of its own background work in flight at once (default: none).

        The study's Ray set-up gives Ray these CPUs on top of the evaluation workers', and
        refuses a cluster on which such a task could never be scheduled.
        """
        return RayResources()

    def pending_since(self) -> float | None:
        """``time.monotonic()`` since when its background work has waited to start with none
        of it running (e.g. a Ray task queued for lack of CPUs); ``None`` when none waits."""
        return None

    # -- the contract ---------------------------------------------------------------------
    @abc.abstractmethod
    def ask(self, n: int) -> list[Proposal]:
        """Up to ``n`` new proposals (fewer, possibly none, when waiting for results)."""

    @abc.abstractmethod
    def tell(self, outcome: Outcome) -> None:
        """The outcome of one of this searcher's proposals."""


# -- registry ----------------------------------------------------------------------------
# Built-in searchers register on import; they are plugins so ``search.base`` stays light.
SEARCHERS: Registry[type[Searcher]] = Registry(
    "searcher", plugins=("search.genetic", "search.optuna_searcher", "search.masking")
)


def register_searcher(name: str) -> Callable[[type[Searcher]], type[Searcher]]:
    """Class decorator adding a :class:`Searcher` subclass under ``name``."""

    def wrap(cls: type[Searcher]) -> type[Searcher]:
        if not (isinstance(cls, type) and issubclass(cls, Searcher)):
            raise ValueError(f"searcher {name!r} must subclass Searcher")
        SEARCHERS.add(name, cls)
        cls.kind = name
        return cls

    return wrap


def available_searchers() -> tuple[str, ...]:
    """Names of every registered searcher."""
    return SEARCHERS.names()


def searcher_class(kind: str) -> type[Searcher]:
    return SEARCHERS.get(kind)


def build_options(kind: str, options: Mapping[str, Any] | None = None) -> Any:
    """The validated ``Options`` of searcher ``kind``; unknown keys are errors."""
    cls = searcher_class(kind)
    options = dict(options or {})
    names = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(options) - names)
    if unknown:
        known = ", ".join(sorted(names)) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for searcher {kind!r} (known: {known})")
    return cls.Options(**options)


def make_searcher(kind: str, context: SearcherContext, options: Mapping[str, Any] | None = None) -> Searcher:
    """Instantiate the registered searcher ``kind`` with validated options."""
    return searcher_class(kind)(context, build_options(kind, options))
