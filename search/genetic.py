"""A DEAP NSGA-II over SearchSpace genomes with two-step fitness (after Hu et al. 2018).

1. Sensitivity pass (generation -1, cheap fidelity): a reference policy (every group at
   ``ratio_max``) and each group alone at each of ``sensitivity_ratios``. A group's lowest
   allowed ratio becomes the lowest tested ratio from which on every tested ratio loses at
   most ``sensitivity_max_drop`` of the study's first quality objective (accuracy, or the
   task's own metric) against the reference; genomes then draw that group's gene from the
   bounded range only.
2. The first generation holds the policies of option ``heuristic_start`` (``{heuristic:
   count}``, as for the Optuna searchers; at most ``population``), the rest are random.
   Every generation is scored with the *cheap* proxy (the study's settings with ``cheap``
   overrides: adaptive BN on a small calibration subset, fewer validation samples,
   fidelity ``"cheap"``). Survival and mating use the cheap values, which every individual
   has, with NSGA-II's constrained domination (feasible first, then by total violation).
3. The top ``top_k`` survivors not evaluated at full fidelity yet are promoted to the full
   proxy (the study's ``[evaluation]`` settings, fidelity ``"full"``); only those can enter
   the Pareto front.

Every evaluation is a proposal, hence a trial (user attr ``fidelity``). The algorithm is a
generator that yields batches of proposals and receives their outcomes, so ``rebuild``
replays it from the seed against the recorded outcomes and ends in exactly the state the
first run was in. No ``deap.creator`` globals: the fitness class is built per searcher.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter, deque
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deap import base, tools

from evaluators.heuristics import check_heuristic_start, start_policies
from search.base import MAXIMIZE, Outcome, Proposal, Searcher, SearcherContext, register_searcher
from spaces.checks import check_int, check_number, check_number_list

log = logging.getLogger(__name__)

CHEAP = "cheap"
# Generations in a row that produced nothing new before the GA declares itself converged.
_MAX_STALE_GENERATIONS = 20


@dataclass(frozen=True)
class GeneticOptions:
    population: int = 8
    top_k: int = 2
    crossover_prob: float = 0.9
    mutation_prob: float | None = None          # per gene; None = 1 / genome length
    sensitivity_ratios: Sequence[float] | None = None  # None = [space.ratio_min]; [] = no pass
    sensitivity_max_drop: float = 0.1
    cheap: Mapping[str, Any] = field(default_factory=dict)  # EvalSettings overrides for step 1
    max_generations: int | None = None
    heuristic_start: Mapping[str, int] = field(default_factory=dict)  # {heuristic: count} in generation 0

    def __post_init__(self) -> None:
        check_int("genetic option population", self.population, 2)
        check_int("genetic option top_k", self.top_k, 0)
        if self.top_k > self.population:
            raise ValueError(f"genetic option top_k ({self.top_k}) exceeds population ({self.population})")
        check_number("genetic option crossover_prob", self.crossover_prob, 0.0, 1.0)
        if self.mutation_prob is not None:  # None: 1 / genome length
            check_number("genetic option mutation_prob", self.mutation_prob, 0.0, 1.0)
        if self.sensitivity_ratios is not None:
            ratios = check_number_list("genetic option sensitivity_ratios", self.sensitivity_ratios)
            for r in ratios:
                if not 0.0 < r <= 1.0:
                    raise ValueError(f"genetic option sensitivity_ratios holds {r!r}, not a ratio in (0, 1]")
            object.__setattr__(self, "sensitivity_ratios", ratios)
        check_number("genetic option sensitivity_max_drop", self.sensitivity_max_drop, 0.0, 1.0)
        if not isinstance(self.cheap, Mapping):
            raise ValueError(f"genetic option cheap must be a table of evaluation settings, got {self.cheap!r}")
        if self.max_generations is not None:
            check_int("genetic option max_generations", self.max_generations, 1)
        object.__setattr__(self, "heuristic_start",
                           check_heuristic_start("genetic option heuristic_start", self.heuristic_start))


class _Individual(list):
    """A genome (list of gene indices) with its cheap outcome and NSGA-II bookkeeping."""

    def __init__(self, genes: Sequence[int], fitness_cls: type) -> None:
        super().__init__(int(g) for g in genes)
        self.fitness = fitness_cls()
        self.violation = math.inf
        self.rank = math.inf
        self.outcome: Outcome | None = None


ProposalBatch = list[Proposal]  # one round of proposals awaiting their outcomes
Program = Generator[ProposalBatch, list[Outcome], None]


@register_searcher("genetic")
class GeneticSearcher(Searcher):
    """NSGA-II (DEAP) with a sensitivity-bounded genome and cheap/full two-step fitness."""

    Options = GeneticOptions
    resume_exact = True

    def __init__(self, context: SearcherContext, options: GeneticOptions | None = None) -> None:
        super().__init__(context, options)
        o = self.options
        space = self.space
        overrides = {"recovery": "adaptive_bn", "finetune_steps": 0, "fidelity": CHEAP,
                     "calibration_samples": min(64, context.settings.calibration_samples),
                     "eval_samples": min(200, context.settings.eval_samples or 200)}
        overrides.update(dict(o.cheap))
        if overrides["fidelity"] == context.settings.fidelity:
            raise ValueError(f"genetic option cheap.fidelity must differ from the study's ({overrides['fidelity']!r})")
        try:
            self.cheap_settings = context.settings.replace(**overrides)
        except TypeError as exc:
            raise ValueError(f"genetic option cheap: {exc}") from None
        ratios = o.sensitivity_ratios if o.sensitivity_ratios is not None else (space.ratio_min,)
        self.sensitivity_ratios = tuple(sorted({space.snap(r) for r in ratios} - {space.ratio_max}))
        self.weights = tuple(1.0 if d == MAXIMIZE else -1.0 for d in context.directions)
        # A fitness class per searcher instead of deap.creator globals (they leak into Ray workers).
        self._fitness_cls = type("GeneticFitness", (base.Fitness,), {"weights": self.weights})
        self._start()

    # -- driving the generator ------------------------------------------------------------
    def _start(self) -> None:
        self.rng = random.Random(self.context.seed)
        self.generation = -1
        self.bounds: list[tuple[int, int]] = [(0, s - 1) for s in self.space.genome_sizes()]
        self._program: Program | None = self._algorithm()
        self._set_batch(next(self._program))

    def _set_batch(self, batch: ProposalBatch | None) -> None:
        self._batch: ProposalBatch = list(batch or [])
        self._issued = [False] * len(self._batch)
        self._results: list[Outcome | None] = [None] * len(self._batch)

    def _advance(self) -> None:
        """Send the completed batch's outcomes into the algorithm; get the next batch."""
        assert self._program is not None
        try:
            self._set_batch(self._program.send(list(self._results)))  # type: ignore[arg-type]
        except StopIteration:
            self._program = None
            self._set_batch(None)

    @property
    def finished(self) -> bool:
        return self._program is None

    @staticmethod
    def _key(p: Proposal) -> tuple[int, str, str]:
        return (p.generation, p.fidelity, p.policy.key())

    def ask(self, n: int) -> list[Proposal]:
        out = []
        for i, issued in enumerate(self._issued):
            if len(out) >= n:
                break
            if not issued:
                self._issued[i] = True
                out.append(self._batch[i])
        return out

    def tell(self, outcome: Outcome) -> None:
        key = self._key(outcome.proposal)
        for i, p in enumerate(self._batch):
            if self._results[i] is None and self._issued[i] and self._key(p) == key:
                self._results[i] = outcome
                break
        else:
            log.warning("genetic searcher %r: ignoring an outcome it is not waiting for (generation %d)",
                        self.context.label, outcome.proposal.generation)
            return
        if all(r is not None for r in self._results):
            self._advance()

    def rebuild(self, outcomes: Sequence[Outcome], pending: Sequence[Proposal] = ()) -> None:
        """Replay the algorithm from the seed against the recorded outcomes."""
        recorded: dict[tuple, deque[Outcome]] = {}
        for o in outcomes:
            recorded.setdefault(self._key(o.proposal), deque()).append(o)
        waiting = Counter(self._key(p) for p in pending)
        self._start()
        replayed = 0
        while self._program is not None:
            for i, p in enumerate(self._batch):
                k = self._key(p)
                if recorded.get(k):
                    self._results[i] = recorded[k].popleft()
                    self._issued[i] = True
                    replayed += 1
                elif waiting[k] > 0:
                    waiting[k] -= 1
                    self._issued[i] = True
            if self._batch and all(r is not None for r in self._results):
                self._advance()
                continue
            break
        left = sum(len(q) for q in recorded.values())
        if left:
            log.warning("genetic searcher %r: %d recorded trial(s) did not match the replay (options changed?)",
                        self.context.label, left)
        log.info("genetic searcher %r rebuilt from %d trial(s), now at generation %d",
                 self.context.label, replayed, self.generation)

    # -- the algorithm ----------------------------------------------------------------------
    def _proposal(self, genome: Sequence[int], generation: int, cheap: bool, meta: dict | None = None) -> Proposal:
        return Proposal(
            self.space.decode(list(genome)),
            generation=generation,
            settings=self.cheap_settings if cheap else None,
            meta=meta or {},
        )

    def _evaluate(
        self, genomes: Sequence[Sequence[int]], generation: int, cheap: bool, memo: dict[tuple, Outcome]
    ) -> Generator[ProposalBatch, list[Outcome], list[Outcome]]:
        """Outcomes of ``genomes``, proposing only those not in ``memo``."""
        new: list[tuple[int, ...]] = []
        for g in genomes:
            t = tuple(g)
            if t not in memo and t not in new:
                new.append(t)
        if new:
            outcomes = yield [self._proposal(g, generation, cheap) for g in new]
            memo.update(zip(new, outcomes))
        return [memo[tuple(g)] for g in genomes]

    def _algorithm(self) -> Program:
        space = self.space
        n_groups = len(space.groups)
        levels = space.levels
        top = len(levels) - 1
        cheap_memo: dict[tuple, Outcome] = {}
        full_memo: dict[tuple, Outcome] = {}
        reference = [top] * n_groups + [0] * (len(self.bounds) - n_groups)

        # 1. sensitivity pass: bound each group's ratio range by its accuracy drop.
        if self.sensitivity_ratios:
            self.generation = -1
            probes = [reference]
            for gi in range(n_groups):
                for r in self.sensitivity_ratios:
                    g = list(reference)
                    g[gi] = levels.index(r)
                    probes.append(g)
            outcomes = yield from self._evaluate(probes, -1, True, cheap_memo)
            self._apply_sensitivity(outcomes)

        # 2. generations: cheap step for all, full step for the top-k survivors.
        o = self.options
        parents: list[_Individual] = []
        starts = [space.encode(p) for p in start_policies(o.heuristic_start, space, self.context.max_flops_ratio,
                                                          self.context.task)][: o.population]
        offspring = [self._individual(g) for g in starts]
        offspring += [self._individual(self._random_genome()) for _ in range(o.population - len(starts))]
        generation, stale = 0, 0
        while o.max_generations is None or generation < o.max_generations:
            self.generation = generation
            unseen = sum(tuple(ind) not in cheap_memo for ind in offspring)
            stale = stale + 1 if unseen == 0 else 0
            if stale >= _MAX_STALE_GENERATIONS:
                log.info("genetic searcher %r converged: no new genome for %d generations", self.context.label, stale)
                return
            outcomes = yield from self._evaluate(offspring, generation, True, cheap_memo)
            for ind, outcome in zip(offspring, outcomes):
                self._set_outcome(ind, outcome)
            parents = self._order(self._unique(parents + offspring))[: o.population]
            promote = [ind for ind in parents if tuple(ind) not in full_memo][: o.top_k]
            if promote:
                yield from self._evaluate(promote, generation, False, full_memo)
            offspring = self._vary(parents, cheap_memo)
            generation += 1

    def _quality(self, outcome: Outcome) -> float | None:
        """The outcome's value of the study's first quality objective (``accuracy``, or the
        task's own metric), signed so that higher is better; None when not measured."""
        from search.promotion import score_objective

        name = score_objective(self.context.objectives)
        if not outcome.ok or outcome.values is None or name is None:
            return None
        i = list(self.context.objectives).index(name)
        return outcome.values[i] if self.context.directions[i] == MAXIMIZE else -outcome.values[i]

    def _apply_sensitivity(self, outcomes: Sequence[Outcome]) -> None:
        space = self.space
        quality = self._quality(outcomes[0])
        if quality is None:
            log.warning("genetic searcher %r: reference evaluation failed; ratio ranges stay unbounded", self.context.label)
            return
        drops: dict[str, list[float]] = {}
        it = iter(outcomes[1:])
        for gi, group in enumerate(space.groups):
            acc = []
            for _ in self.sensitivity_ratios:
                value = self._quality(next(it))
                acc.append(value if value is not None else -math.inf)
            drops[group.name] = [quality - a for a in acc]
            # lowest tested ratio from which on every tested ratio stays within the drop budget
            lower = None
            for i in range(len(acc) - 1, -1, -1):
                if drops[group.name][i] <= self.options.sensitivity_max_drop:
                    lower = self.sensitivity_ratios[i]
                else:
                    break
            levels = space.levels
            if lower is None:  # even the mildest tested ratio hurts: keep above it
                lower_idx = min(levels.index(self.sensitivity_ratios[-1]) + 1, len(levels) - 1)
            else:
                lower_idx = levels.index(lower)
            self.bounds[gi] = (lower_idx, len(levels) - 1)
        log.info("genetic searcher %r: sensitivity bounds %s", self.context.label,
                 {g.name: space.levels[self.bounds[i][0]] for i, g in enumerate(space.groups)})

    # -- NSGA-II pieces (DEAP) ------------------------------------------------------------
    def _individual(self, genes: Sequence[int]) -> _Individual:
        return _Individual(genes, self._fitness_cls)

    def _random_genome(self) -> list[int]:
        return [self.rng.randint(lo, hi) for lo, hi in self.bounds]

    @staticmethod
    def _set_outcome(ind: _Individual, outcome: Outcome) -> None:
        ind.outcome = outcome
        ind.violation = outcome.violation
        if outcome.ok:
            ind.fitness.values = tuple(outcome.values)
        else:
            del ind.fitness.values

    @staticmethod
    def _unique(pop: Sequence[_Individual]) -> list[_Individual]:
        seen, out = set(), []
        for ind in pop:
            if tuple(ind) not in seen:
                seen.add(tuple(ind))
                out.append(ind)
        return out

    def _order(self, pop: Sequence[_Individual]) -> list[_Individual]:
        """Constrained NSGA-II order: feasible by front and crowding, then by violation."""
        feasible = [ind for ind in pop if ind.violation == 0.0 and ind.fitness.valid]
        infeasible = sorted((ind for ind in pop if not (ind.violation == 0.0 and ind.fitness.valid)),
                            key=lambda ind: ind.violation)
        ordered: list[_Individual] = []
        if feasible:
            fronts = tools.sortNondominated(feasible, len(feasible))
            for rank, front in enumerate(fronts):
                tools.emo.assignCrowdingDist(front)
                for ind in front:
                    ind.rank = rank
                ordered.extend(sorted(front, key=lambda ind: -ind.fitness.crowding_dist))
        for ind in infeasible:
            ind.rank = math.inf
        return ordered + infeasible

    def _better(self, a: _Individual, b: _Individual) -> _Individual:
        def key(ind: _Individual) -> tuple[float, float, float]:
            crowd = getattr(ind.fitness, "crowding_dist", 0.0) if ind.violation == 0.0 else 0.0
            return (ind.violation, ind.rank, -crowd)

        return a if key(a) <= key(b) else b

    def _vary(self, parents: Sequence[_Individual], memo: Mapping[tuple, Outcome]) -> list[_Individual]:
        o = self.options
        n_genes = len(self.bounds)
        indpb = o.mutation_prob if o.mutation_prob is not None else 1.0 / max(1, n_genes)
        children: list[_Individual] = []
        seen = {tuple(p) for p in parents}
        attempts = 0
        while len(children) < o.population and attempts < 20 * o.population:
            attempts += 1
            p1 = self._better(*self.rng.sample(list(parents), 2)) if len(parents) > 1 else parents[0]
            p2 = self._better(*self.rng.sample(list(parents), 2)) if len(parents) > 1 else parents[0]
            c1, c2 = list(p1), list(p2)
            if self.rng.random() < o.crossover_prob:
                for i in range(n_genes):  # uniform crossover
                    if self.rng.random() < 0.5:
                        c1[i], c2[i] = c2[i], c1[i]
            for child in (c1, c2):
                for i, (lo, hi) in enumerate(self.bounds):
                    if hi > lo and self.rng.random() < indpb:
                        child[i] = self.rng.choice([v for v in range(lo, hi + 1) if v != child[i]])
                t = tuple(child)
                # prefer genomes never seen; accept a repeat only when attempts run out
                if t in seen or (t in memo and attempts < 10 * o.population):
                    continue
                seen.add(t)
                children.append(self._individual(child))
                if len(children) >= o.population:
                    break
        return children
