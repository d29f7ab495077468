"""Searchers driven by Optuna samplers: TPE, NSGA-II and random (the baseline).

Each searcher is bound to a trial source over its own seeded sampler on the shared study
(``bind``; the recorder creates the trials), so its trials carry exactly the space's params.
Samplers see every trial of the study of the fidelities in option ``fidelities`` (default
``["full"]``): a portfolio — TPE learns from the GA's promoted trials too, but not from its
cheap step, whose accuracies are not comparable (``fidelities = []`` shows everything).
Optuna's NSGA-II builds its populations from its own generations only. Constraints reach
the samplers through ``trial.set_constraint`` (written by the recorder before ``tell``),
which Optuna 5 reads as ``trial.constraints``; the deprecated ``constraints_func`` is not
needed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import optuna

from evaluators.heuristics import check_heuristic_start, start_policies
from search.base import FULL, Outcome, Proposal, Searcher, SearcherContext, register_searcher
from search.recorder import SampledTrial, TrialSource
from spaces.checks import check_bool, check_int, check_number, check_str_list
from spaces.policy import Policy


class _FidelityView:
    """A study as a sampler should see it: only trials of the given fidelities.

    Cheap (low-fidelity) trials of the GA are systematically less accurate than full ones;
    a sampler mixing both would learn that the GA's regions are bad. Everything but the
    trial lists is the real study.
    """

    def __init__(self, study: optuna.Study, fidelities: frozenset[str]) -> None:
        self._study = study
        self._fidelities = fidelities

    def _keep(self, trials: Any) -> list:
        # proposals of other tools (no fidelity attr) count as full
        return [t for t in trials if t.user_attrs.get("fidelity", FULL) in self._fidelities]

    def _get_trials(self, *args: Any, **kwargs: Any) -> list:
        return self._keep(self._study._get_trials(*args, **kwargs))

    def get_trials(self, *args: Any, **kwargs: Any) -> list:
        return self._keep(self._study.get_trials(*args, **kwargs))

    @property
    def trials(self) -> list:
        return self.get_trials()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


def on_grid(value: Any, distribution: Any) -> Any:
    """``value`` as its grid level: a stepped float sampled as ``low + k * step`` carries
    float noise (0.9000000000000001), which optuna-dashboard and the study's params would
    show; the space's levels are rounded to 10 decimals the same way (``SearchSpace.levels``)."""
    if isinstance(distribution, optuna.distributions.FloatDistribution) and distribution.step is not None \
            and isinstance(value, float):
        return round(value, 10)
    return value


class _SamplerView(optuna.samplers.BaseSampler):
    """Wraps a sampler: it learns only from trials of some fidelities (see _FidelityView;
    none given: from every trial) and its stepped floats are recorded on the grid (``on_grid``)."""

    def __init__(self, inner: optuna.samplers.BaseSampler, fidelities: Sequence[str]) -> None:
        self.inner = inner
        self.fidelities = frozenset(fidelities)

    def _view(self, study: optuna.Study) -> Any:
        return _FidelityView(study, self.fidelities) if self.fidelities else study

    def infer_relative_search_space(self, study, trial):  # type: ignore[no-untyped-def]
        return self.inner.infer_relative_search_space(self._view(study), trial)

    def sample_relative(self, study, trial, search_space):  # type: ignore[no-untyped-def]
        values = self.inner.sample_relative(self._view(study), trial, search_space)
        return {name: on_grid(value, search_space.get(name)) for name, value in values.items()}

    def sample_independent(self, study, trial, param_name, param_distribution):  # type: ignore[no-untyped-def]
        value = self.inner.sample_independent(self._view(study), trial, param_name, param_distribution)
        return on_grid(value, param_distribution)

    def before_trial(self, study, trial):  # type: ignore[no-untyped-def]
        self.inner.before_trial(self._view(study), trial)

    def after_trial(self, study, trial, state, values):  # type: ignore[no-untyped-def]
        self.inner.after_trial(self._view(study), trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def derived_seed(seed: int, salt: int) -> int:
    """A seed for the ``salt``-th restart of a searcher seeded with ``seed``."""
    return (int(seed) * 1_000_003 + int(salt) * 7_919) % (2**32)


class OptunaSearcher(Searcher):
    """Base of the sampler-backed searchers: ``ask`` takes sampled trials from the source."""

    def __init__(self, context: SearcherContext, options: Any = None) -> None:
        super().__init__(context, options)
        self._round = 0
        self._seed = context.seed
        self._asked = 0
        self._starts: list[Policy] | None = None
        self.trials: TrialSource | None = None

    #: the Optuna sampler class; its keyword arguments are the options' fields but SamplerOptions'
    sampler_class: type[optuna.samplers.BaseSampler] | None = None

    def make_sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        if self.sampler_class is None:
            raise NotImplementedError(f"{type(self).__name__} sets neither sampler_class nor make_sampler")
        kwargs = {} if self.options is None else {
            f.name: getattr(self.options, f.name) for f in fields(self.options) if f.name not in _OWN_OPTIONS}
        return self.sampler_class(seed=seed, **kwargs)

    def start_policies(self) -> list[Policy]:
        """The first proposals, fixed params of the sampler's first trials, so it learns from a
        front the heuristics already reach: option ``uniform_start`` (uniform policies spread
        over the FLOPs budget), then option ``heuristic_start`` (``evaluators.heuristics.start_policies``).
        Computed once per searcher."""
        if self._starts is None:
            n = getattr(self.options, "uniform_start", 0)
            starts = self.space.uniform_sweep(n, self.context.max_flops_ratio) if n else []
            spec = getattr(self.options, "heuristic_start", {})
            heuristic = start_policies(spec, self.space, self.context.max_flops_ratio, self.context.task)
            self._starts = starts + [p for p in heuristic if p not in starts]
        return self._starts

    def sampler(self) -> optuna.samplers.BaseSampler:
        with warnings.catch_warnings():  # experimental-feature warnings are noise here
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = self.make_sampler(self._seed)
        return _SamplerView(sampler, getattr(self.options, "fidelities", None) or ())

    def rebuild(self, outcomes: Sequence[Outcome], pending: Sequence[Proposal] = ()) -> None:
        # The sampler reads the study itself; only the RNG must not restart where the
        # first run started, or the random start-up phase would re-propose its policies.
        done = list(outcomes) + list(pending)
        self._asked = len(done)
        if done:
            self._seed = derived_seed(self.context.seed, len(done))
            self._round = max(p.generation for p in [o.proposal for o in outcomes] + list(pending)) + 1

    def generation_of(self, trial: SampledTrial) -> int:
        return self._round

    def ask(self, n: int) -> list[Proposal]:
        if self.trials is None:
            raise RuntimeError(f"searcher {self.kind!r} asked before bind(trials)")
        proposals = []
        starts = self.start_policies()
        for _ in range(max(0, n)):
            fixed = self.space.to_params(starts[self._asked]) if self._asked < len(starts) else None
            self._asked += 1
            trial = self.trials.ask(fixed)
            # samplers may return grid values off by float rounding (0.6000000000000001):
            # snap so equal policies compare and cache equal
            space = self.space
            policy = space.decode(space.encode(space.from_params(trial.params)))
            proposals.append(Proposal(policy, generation=self.generation_of(trial), trial=trial))
            self._round += 1
        return proposals

    def tell(self, outcome: Outcome) -> None:
        # Nothing to keep: the sampler reads values and constraints from the study.
        return None


@dataclass(frozen=True)
class SamplerOptions:
    """Options every Optuna-backed searcher has besides its sampler's own arguments."""

    kind: ClassVar[str] = "sampler"
    fidelities: Sequence[str] = (FULL,)   # trials the sampler learns from; [] = all
    uniform_start: int = 0                # first proposals: uniform policies over the FLOPs budget
    heuristic_start: Mapping[str, int] = field(default_factory=dict)  # then {heuristic: count} policies

    def __post_init__(self) -> None:
        object.__setattr__(self, "fidelities", check_str_list(f"{self.kind} option fidelities", self.fidelities))
        check_int(f"{self.kind} option uniform_start", self.uniform_start, 0)
        object.__setattr__(self, "heuristic_start",
                           check_heuristic_start(f"{self.kind} option heuristic_start", self.heuristic_start))


# Fields every sampler-backed searcher handles itself (not sampler arguments).
_OWN_OPTIONS = frozenset(f.name for f in fields(SamplerOptions))


@dataclass(frozen=True)
class TPEOptions(SamplerOptions):
    kind: ClassVar[str] = "tpe"
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool = True
    constant_liar: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_startup_trials", "n_ei_candidates"):
            check_int(f"tpe option {name}", getattr(self, name), 1)
        for name in ("multivariate", "constant_liar"):
            check_bool(f"tpe option {name}", getattr(self, name))


@register_searcher("tpe")
class TPESearcher(OptunaSearcher):
    """Optuna's (multi-objective, constrained) TPE."""

    Options = TPEOptions
    sampler_class = optuna.samplers.TPESampler


@dataclass(frozen=True)
class NSGA2Options(SamplerOptions):
    kind: ClassVar[str] = "nsga2"
    population_size: int = 8
    mutation_prob: float | None = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("nsga2 option population_size", self.population_size, 2)
        for name in ("mutation_prob", "crossover_prob", "swapping_prob"):
            value = getattr(self, name)
            if not (name == "mutation_prob" and value is None):  # None: Optuna's default (1 / params)
                check_number(f"nsga2 option {name}", value, 0.0, 1.0)


@register_searcher("nsga2")
class NSGA2Searcher(OptunaSearcher):
    """Optuna's NSGA-II with constrained domination; generation = the sampler's."""

    Options = NSGA2Options
    sampler_class = optuna.samplers.NSGAIISampler

    def generation_of(self, trial: SampledTrial) -> int:
        # Optuna's GA samplers keep the generation in a system attr "<Sampler>:generation".
        for key, value in trial.sampler_attrs().items():
            if key.endswith(":generation") and isinstance(value, int):
                return value
        return 0


@register_searcher("random")
class RandomSearcher(OptunaSearcher):
    """Uniform sampling on the grid: the baseline every searcher must beat."""

    sampler_class = optuna.samplers.RandomSampler
