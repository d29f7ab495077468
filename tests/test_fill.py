"""Budget fill (spaces.fill): proposals grown to the FLOPs level above them, through a study."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from search.config import ConfigError, load_config
from search.records import read_trials
from search.runner import run_study
from search.storage import open_storage, parse_storage
from spaces.fill import BudgetFill, FillConfig
from spaces.policy import Policy
from tests.fakes import FakePool, Harness, tiny_config, tiny_space

optuna.logging.set_verbosity(optuna.logging.WARNING)

LEVELS = (0.3, 0.6)


@pytest.fixture(scope="module")
def space():
    return tiny_space()


def policies(space, n=30, seed=0):
    rng = np.random.default_rng(seed)
    return [space.sample(rng) for _ in range(n)]


def test_a_policy_is_grown_to_the_level_above_it_and_no_further(space):
    fill = BudgetFill(space, LEVELS)
    grown = 0
    for policy in policies(space):
        before = space.flops_ratio(policy)
        filled = fill.project(policy)
        after = space.flops_ratio(filled)
        level = fill.target(before)
        if level is None:
            assert filled == policy
            continue
        assert before <= after <= level + 1e-12
        # as large as it can be: growing every uncapped ratio by one more percent crosses the level
        if filled != policy:
            grown += 1
            assert space.flops_ratio(fill.scaled(filled, 1.01)) > level or all(
                r >= space.ratio_max for r in filled.ratios.values())
    assert grown >= 10


def test_the_shape_is_kept_every_ratio_grows_by_one_factor(space):
    fill = BudgetFill(space, (0.6,))
    policy = Policy(ratios={n: 0.2 + 0.05 * (i % 3) for i, n in enumerate(space.group_names)}, method="l1")
    filled = fill.project(policy)
    factors = {round(filled.ratio(n) / policy.ratio(n), 3) for n in space.group_names
               if filled.ratio(n) < space.ratio_max}
    assert len(factors) == 1 and factors.pop() > 1.0


def test_ratios_stay_within_ratio_max(space):
    capped = space.with_config(ratio_max=0.5)
    fill = BudgetFill(capped, (1.0,))
    filled = fill.project(capped.uniform(0.2))
    assert all(r == 0.5 for r in filled.ratios.values())


def test_a_policy_above_every_level_is_left_alone(space):
    big = space.uniform(1.0)
    assert BudgetFill(space, (0.5,)).project(big) is big


def test_config_checks_its_levels():
    assert FillConfig.from_dict({"levels": [0.15, 0.3]}).levels == (0.15, 0.3)
    for bad, words in (([0.0], "in (0, 1]"), ([1.5], "in (0, 1]"), ([0.3, 0.2], "strictly increasing"),
                       ("0.3", "a list"), ([True], "in (0, 1]")):
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            FillConfig(levels=bad)
    with pytest.raises(ValueError, match="unknown key 'level'"):
        FillConfig.from_dict({"level": [0.3]})


def test_the_study_config_defaults_to_the_flops_constraint_and_refuses_what_cannot_work(tmp_path):
    config = load_config(tiny_config(tmp_path, extra="\n[fill]\n"))
    assert config.fill_levels == (0.7,)
    assert load_config(tiny_config(tmp_path, extra="\n[fill]\nlevels = [0.2, 0.5]\n")).fill_levels == (0.2, 0.5)
    with pytest.raises(ConfigError, match="needs FLOPs levels"):
        load_config(tiny_config(tmp_path, constraints="", extra="\n[fill]\n"))
    with pytest.raises(ConfigError, match="above \\[constraints\\] max_flops_ratio 0.7"):
        load_config(tiny_config(tmp_path, extra="\n[fill]\nlevels = [0.8]\n"))


def test_the_driver_records_the_filled_policy_and_tells_the_searcher_its_own(space):
    fill = BudgetFill(space, LEVELS)
    h = Harness(space, projection=fill)
    done = h.run(h.searcher("random", seed=1), 12)
    records = sorted(h.records(), key=lambda r: r.number)
    assert len(records) == 12
    changed = 0
    for proposal, record in zip(done, records):
        assert record.policy == fill.project(proposal.policy)
        if record.policy != proposal.policy:
            changed += 1
            assert Policy.from_json(record.meta["proposal"]) == proposal.policy
            assert record.metrics.flops_ratio <= fill.target(space.flops_ratio(proposal.policy)) + 1e-12
    assert changed >= 6
    assert [o.proposal.policy for o in h.outcomes()] == [p.policy for p in done]


def test_a_study_with_fill_runs_and_refuses_a_resume_with_other_levels(tmp_path):
    path = tiny_config(tmp_path, n_trials=8, extra="\n[fill]\nlevels = [0.4, 0.7]\n")
    config = load_config(path)
    run_study(config, pool_factory=lambda prepared, _a: FakePool(prepared.space), progress=False)
    storage = open_storage(parse_storage(config.study.storage_url))
    records = read_trials(optuna.load_study(study_name=config.name, storage=storage))
    assert len(records) == 8
    flops = sorted(r.metrics.flops_ratio for r in records)
    # every trial sits on (just under) one of the two levels, never between them far below
    assert all(0.3 < f <= 0.4 + 1e-12 or 0.6 < f <= 0.7 + 1e-12 for f in flops), flops
    # the export rebuilds the filled policy the trials recorded
    from search.export import export_study

    exported = export_study(config, formats=())
    policies = {r.number: r.policy for r in records}
    assert exported.metrics
    for number, info in exported.metrics.items():
        directory = next(p for p in exported.directories if p.name == f"trial-{number}")
        assert Policy.from_json((directory / "policy.json").read_text()) == policies[number]
    changed = load_config(tiny_config(tmp_path, n_trials=8, extra="\n[fill]\nlevels = [0.5, 0.7]\n"))
    with pytest.raises(ConfigError, match="fill"):
        run_study(changed, pool_factory=lambda prepared, _a: FakePool(prepared.space), progress=False)
