"""Contract suite every registered searcher passes (cf. Optuna's samplers_tests), with a
synthetic evaluator; then the genetic searcher's own behaviour (sensitivity bounds,
two-step fitness, exact resume)."""

from __future__ import annotations

import time

import optuna
import pytest

from evaluators.metrics import Metrics
from search.base import (
    FULL,
    Searcher,
    available_searchers,
    build_options,
    make_searcher,
    register_searcher,
)
from search.config import ConstraintsSection
from tests.fakes import CountingMark, Harness, synthetic_metrics, tiny_space

optuna.logging.set_verbosity(optuna.logging.WARNING)

SEARCHERS = available_searchers()
# Searchers whose proposals are random draws: another seed must give other proposals.
STOCHASTIC = {"tpe", "nsga2", "random", "genetic"}


@pytest.fixture(scope="module")
def space():
    return tiny_space()


def keys(proposals):
    return [(p.policy.key(), p.fidelity, p.generation) for p in proposals]


def test_required_searchers_are_registered():
    assert {"tpe", "nsga2", "random", "genetic"} <= set(SEARCHERS)


@pytest.mark.parametrize("kind", SEARCHERS)
def test_proposals_are_valid_and_recorded_with_their_params(kind, space):
    h = Harness(space)
    done = h.run(h.searcher(kind, seed=3), 14)
    assert len(done) == 14
    study = optuna.load_study(study_name=h.name, storage=h.storage)
    trials = {t.number: t for t in study.trials}
    assert len(trials) == 14
    for proposal, trial in h.log:
        space.validate(proposal.policy)
        assert all(proposal.policy.ratio(g) in space.levels for g in space.group_names)
        frozen = trials[trial.number]
        expected = space.to_params(proposal.policy)
        assert frozen.params.keys() == expected.keys()
        for name, value in expected.items():  # samplers may be off the grid by float rounding
            assert frozen.params[name] == (pytest.approx(value, abs=1e-9) if isinstance(value, float) else value)
        assert frozen.user_attrs["searcher"] == "s"
        assert frozen.user_attrs["fidelity"] == proposal.fidelity
        assert frozen.user_attrs["generation"] == proposal.generation
        assert frozen.state == optuna.trial.TrialState.COMPLETE


@pytest.mark.parametrize("kind", SEARCHERS)
def test_deterministic_under_a_seed(kind, space):
    runs = []
    for seed in (5, 5, 6):
        h = Harness(space)
        runs.append(keys(h.run(h.searcher(kind, seed=seed), 10)))
    assert runs[0] == runs[1]
    if kind in STOCHASTIC:
        assert runs[0] != runs[2]


@pytest.mark.parametrize("kind", SEARCHERS)
def test_tell_accepts_failures_and_infeasible_outcomes(kind, space):
    # a constraint only the smallest policies meet, and every third evaluation failing (every
    # trial evaluated, duplicates included, so a third of the trials fail)
    h = Harness(space, constraints=ConstraintsSection(max_flops_ratio=space.min_flops_ratio + 0.01),
                share_results=False)
    count = {"n": 0}

    def metrics(p):
        count["n"] += 1
        if count["n"] % 3 == 0:
            return Metrics.failure("synthetic failure", fidelity=p.fidelity)
        return synthetic_metrics(space, p.policy, p.settings)

    done = h.run(h.searcher(kind, seed=1), 12, metrics=metrics)
    assert len(done) == 12
    states = [t.state for t in optuna.load_study(study_name=h.name, storage=h.storage).trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 4


@pytest.mark.parametrize("kind", SEARCHERS)
def test_state_is_rebuilt_on_resume(kind, space):
    h = Harness(space)
    first = h.run(h.searcher(kind, seed=2), 10)
    resumed = h.searcher(kind, seed=2)
    resumed.rebuild(h.outcomes())
    after = h.run(resumed, 8)
    for p in after:
        space.validate(p.policy)
    # it continues instead of restarting from scratch
    assert keys(after)[:5] != keys(first)[:5]
    assert min(p.generation for p in after) >= max(p.generation for p in first if p.generation >= 0)
    if getattr(type(resumed), "resume_exact", False):
        straight = Harness(space)
        assert keys(straight.run(straight.searcher(kind, seed=2), 18)) == keys(first + after)


@pytest.mark.parametrize("kind", SEARCHERS)
def test_pending_proposals_are_not_proposed_again(kind, space):
    h = Harness(space)
    h.run(h.searcher(kind, seed=4), 9)
    outcomes = h.outcomes()
    finished, pending = outcomes[:-2], outcomes[-2:]
    resumed = h.searcher(kind, seed=4)
    resumed.rebuild(finished, [o.proposal for o in pending])
    for o in pending:  # the runner re-submits them and tells their outcomes later
        resumed.tell(o)
    nxt = resumed.ask(4)
    while not nxt and resumed.waiting:  # background work (masking runs): poll as the runner does
        time.sleep(0.05)
        nxt = resumed.ask(4)
    assert nxt
    pending_keys = {(o.proposal.policy.key(), o.proposal.fidelity, o.proposal.generation) for o in pending}
    if getattr(type(resumed), "resume_exact", False):
        assert not pending_keys & set(keys(nxt))
        straight = Harness(space)
        s = straight.searcher(kind, seed=4)
        straight.run(s, 9)
        assert keys(nxt) == keys(s.ask(4))


@pytest.mark.parametrize("kind", SEARCHERS)
def test_under_a_watermark_trials_are_marked_and_the_searcher_keeps_its_own(kind, space):
    h = Harness(space, projection=CountingMark())
    done = h.run(h.searcher(kind, seed=3), 8)
    assert len(done) == 8
    for proposal, record in zip(done, sorted(h.records(), key=lambda r: r.number)):
        space.validate(record.policy)
        assert record.policy == CountingMark().project(proposal.policy)
    assert [o.proposal.policy for o in h.outcomes()] == [p.policy for p in done]


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        @register_searcher("tpe")
        class Other(Searcher):  # noqa: F841
            def ask(self, n):
                return []

            def tell(self, outcome):
                pass

    with pytest.raises(ValueError, match="unknown searcher 'bogus'"):
        build_options("bogus")
    with pytest.raises(ValueError, match="unknown option.*'tpe'"):
        build_options("tpe", {"n_startup": 3})
    with pytest.raises(ValueError, match="population"):
        build_options("genetic", {"population": 1})


# -- the genetic searcher ------------------------------------------------------------------------
def test_genetic_sensitivity_pass_bounds_sensitive_groups(space):
    h = Harness(space)
    ga = h.searcher("genetic", seed=0)
    done = h.run(ga, 40)
    probes = [p for p in done if p.generation == -1]
    assert len(probes) == 1 + len(space.groups)  # reference + each group at ratio_min
    assert all(p.fidelity == "cheap" for p in probes)
    # synthetic accuracy: later groups weigh more, so the last group is bounded, the first is not
    assert ga.bounds[0][0] == 0
    last = len(space.groups) - 1
    assert ga.bounds[last][0] > 0
    lowest = space.levels[ga.bounds[last][0]]
    for p in done:
        if p.generation >= 0:
            assert p.policy.ratio(space.group_names[last]) >= lowest


def test_genetic_two_step_fitness_promotes_top_k_to_full(space):
    h = Harness(space)
    ga = h.searcher("genetic", seed=1, options={"population": 6, "top_k": 2, "sensitivity_ratios": []})
    done = h.run(ga, 40)
    cheap_seen = set()
    by_gen = {}
    for p in done:
        by_gen.setdefault(p.generation, []).append(p)
        if p.fidelity == "cheap":
            cheap_seen.add(p.policy.key())
        else:
            assert p.fidelity == FULL
            assert p.policy.key() in cheap_seen  # promoted only after its cheap step
    for gen, ps in by_gen.items():
        fids = [p.fidelity for p in ps]
        if FULL in fids:
            assert fids.count(FULL) <= 2
            assert fids.index(FULL) > 0 and all(f == FULL for f in fids[fids.index(FULL):])
    full_keys = [p.policy.key() for p in done if p.fidelity == FULL]
    assert len(full_keys) == len(set(full_keys))  # never promoted twice
    assert ga.cheap_settings.calibration_samples < h.settings.calibration_samples


def test_genetic_uses_no_deap_creator_globals(space):
    from deap import creator

    before = set(vars(creator))
    h = Harness(space)
    h.run(h.searcher("genetic", seed=0), 10)
    assert set(vars(creator)) == before


def test_genetic_cheap_options_are_validated(space):
    h = Harness(space)
    with pytest.raises(ValueError, match="cheap"):
        make_searcher("genetic", h.context(), {"cheap": {"no_such_setting": 1}})
    with pytest.raises(ValueError, match="unknown recovery"):
        make_searcher("genetic", h.context(), {"cheap": {"recovery": "nope"}})


@pytest.mark.parametrize("kind", ["tpe", "nsga2"])
def test_optuna_samplers_learn_from_full_fidelity_only_by_default(kind, space):
    h = Harness(space)
    h.run(h.searcher("genetic", seed=0, label="ga"), 14, label="ga")  # sensitivity pass, cheap + full
    study = optuna.load_study(study_name=h.name, storage=h.storage)
    fidelities = [t.user_attrs["fidelity"] for t in study.trials]
    assert "cheap" in fidelities and "full" in fidelities
    seen = h.searcher(kind, seed=0).sampler()._view(study).get_trials()
    assert [t.user_attrs["fidelity"] for t in seen] == ["full"] * fidelities.count("full")
    everything = h.searcher(kind, seed=0, options={"fidelities": []}).sampler()
    assert everything._view(study) is study  # with no fidelities the sampler sees every trial
    after = h.run(h.searcher(kind, seed=0), 6)  # and proposing through the view works
    assert len(after) == 6


@pytest.mark.parametrize("kind", ["tpe", "nsga2"])
def test_uniform_start_proposes_the_uniform_sweep_first(kind, space):
    h = Harness(space)  # max_flops_ratio 0.6
    done = h.run(h.searcher(kind, seed=1, options={"uniform_start": 3}), 8)
    sweep = space.uniform_sweep(3, max_flops_ratio=0.6)
    assert len(sweep) == 3
    assert [p.policy.key() for p in done[:3]] == [p.key() for p in sweep]
    assert all(len(set(p.policy.ratios.values())) == 1 for p in done[:3])
    assert any(len(set(p.policy.ratios.values())) > 1 for p in done[3:])  # then the sampler's own
    study = optuna.load_study(study_name=h.name, storage=h.storage)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)  # nothing left waiting
    resumed = h.searcher(kind, seed=1, options={"uniform_start": 3})
    resumed.rebuild(h.outcomes())
    assert all(len(set(p.policy.ratios.values())) > 1 or p.policy.key() not in {q.key() for q in sweep}
               for p in h.run(resumed, 4))  # a resumed searcher does not start over


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_uniform_start_is_validated(value):
    with pytest.raises(ValueError, match="uniform_start"):
        build_options("tpe", {"uniform_start": value})


@pytest.mark.parametrize("kind, options, message", [
    ("tpe", {"n_ei_candidates": 0}, "tpe option n_ei_candidates must be an integer >= 1, got 0"),
    ("tpe", {"multivariate": "yes"}, "tpe option multivariate must be true or false, got 'yes'"),
    ("tpe", {"fidelities": "full"}, "tpe option fidelities must be a list of strings"),
    ("nsga2", {"population_size": 1}, "nsga2 option population_size must be an integer >= 2, got 1"),
    ("nsga2", {"swapping_prob": 1.5}, "nsga2 option swapping_prob must be <= 1.0, got 1.5"),
    ("nsga2", {"uniform_start": -1}, "nsga2 option uniform_start must be an integer >= 0, got -1"),
    ("genetic", {"top_k": 9}, "genetic option top_k (9) exceeds population (8)"),
    ("genetic", {"mutation_prob": -0.1}, "genetic option mutation_prob must be >= 0.0, got -0.1"),
    ("genetic", {"sensitivity_ratios": [0.5, 0.0]}, "sensitivity_ratios holds 0.0, not a ratio in (0, 1]"),
    ("genetic", {"max_generations": 0}, "genetic option max_generations must be an integer >= 1, got 0"),
    ("masking", {"tau_start": 0.1, "tau_end": 1.0}, "masking tau schedule needs 0 < tau_end <= tau_start"),
    ("masking", {"parallel": 0}, "masking parallel must be an integer >= 1, got 0"),
])
def test_bad_options_are_one_line_errors_naming_the_option(kind, options, message):
    with pytest.raises(ValueError) as info:
        build_options(kind, options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_options_share_one_definition_of_common_fields():
    from search.masking import MaskingOptions
    from search.masking_core import MaskingConfig, MaskingSchedule
    from search.optuna_searcher import NSGA2Options, SamplerOptions, TPEOptions

    assert issubclass(TPEOptions, SamplerOptions) and issubclass(NSGA2Options, SamplerOptions)
    assert issubclass(MaskingOptions, MaskingSchedule) and issubclass(MaskingConfig, MaskingSchedule)
    options = MaskingOptions(steps=7, kd=False, targets=[0.4])
    run = options.config(0.4, 5.0, seed=2, method="l2")
    assert (run.steps, run.kd, run.target, run.lam, run.seed, run.method) == (7, False, 0.4, 5.0, 2, "l2")
    assert run.schedule() == options.schedule()


@pytest.mark.parametrize("kind", ["tpe", "nsga2", "random"])
def test_sampled_params_are_recorded_on_the_grid(kind):
    """Stepped floats come back from Optuna's samplers as low + k * step with float noise
    (0.9000000000000001); the recorded params are the grid levels themselves."""
    import optuna

    from tests.fakes import Harness, tiny_space

    space = tiny_space()
    harness = Harness(space)
    harness.run(harness.searcher(kind, seed=3, options={"n_startup_trials": 2} if kind == "tpe" else None), 12)
    levels = set(space.levels)
    for trial in optuna.load_study(study_name=harness.name, storage=harness.storage).trials:
        for name in space.group_names:
            assert trial.params[name] in levels, (name, trial.params[name])
