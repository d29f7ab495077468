import numpy as np
import optuna
import pytest
import torch

from search.params import distributions
from spaces.policy import Policy
from spaces.space import SearchSpace, SpaceConfig, kept_channels
from tests.architectures import ResNetStyle


@pytest.fixture(scope="module")
def space():
    torch.manual_seed(0)
    return SearchSpace.from_model(ResNetStyle(widths=(16, 32), blocks=1), torch.randn(1, 3, 16, 16),
                                  ratio_min=0.2, ratio_step=0.1, methods=("l1", "fpgm"))


def test_levels_span_the_range(space):
    assert space.levels[0] == 0.2 and space.levels[-1] == 1.0 and len(space.levels) == 9


def test_genome_round_trip(space):
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = space.sample(rng)
        assert space.decode(space.encode(p)) == p


def test_optuna_params_round_trip_and_distributions_accept_them(space):
    rng = np.random.default_rng(2)
    dists = distributions(space)
    for _ in range(10):
        p = space.sample(rng)
        params = space.to_params(p)
        assert set(params) == set(dists)
        for name, value in params.items():
            assert dists[name]._contains(dists[name].to_internal_repr(value))
        assert space.from_params(params) == p


def test_study_ask_with_space_distributions_gives_valid_policies(space):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask(distributions(space))
        space.validate(space.from_params(trial.params))


def test_sampling_is_deterministic_under_a_seed(space):
    a = [space.sample(np.random.default_rng(7)) for _ in range(3)]
    b = [space.sample(np.random.default_rng(7)) for _ in range(3)]
    assert a == b


def test_uniform_covers_every_group(space):
    p = space.uniform(0.5)
    assert set(p.ratios) == set(space.group_names)


@pytest.mark.parametrize("channels,ratio,round_to,expected", [
    (64, 0.5, 1, 32), (64, 0.5, 8, 32), (64, 0.45, 8, 32), (64, 0.01, 8, 8), (10, 0.01, 1, 1), (6, 0.5, 8, 6),
    (64, 1.0, 8, 64),
])
def test_kept_channels_rounding(channels, ratio, round_to, expected):
    assert kept_channels(channels, ratio, round_to) == expected


def test_round_to_changes_kept_counts(space):
    coarse = space.with_config(round_to=8)
    p = space.uniform(0.3)
    assert all(k % 8 == 0 for k in coarse.kept(p).values())


@pytest.mark.parametrize("kwargs,match", [
    ({"ratio_min": 0.8, "ratio_max": 0.5}, "inverted"),
    ({"ratio_min": 0.0}, "ratio range"),
    ({"ratio_max": 1.5}, "ratio range"),
    ({"ratio_step": 0.0}, "ratio_step"),
    ({"ratio_step": 0.3, "ratio_min": 0.2}, "does not divide"),
    ({"methods": ()}, "at least one pruning method"),
    ({"methods": "l1"}, "methods must be a list of strings"),
    ({"method_per_group": 1}, "method_per_group must be true or false"),
    ({"round_to": 0}, "round_to"),
])
def test_bad_space_options_are_named(space, kwargs, match):
    with pytest.raises(ValueError, match=match):
        space.with_config(**kwargs)
    with pytest.raises(ValueError, match=match):
        SpaceConfig(**kwargs)


def test_space_config_defaults_and_its_table():
    assert SpaceConfig().ratio_min == 0.2  # the default a study's [space] gets
    config = SpaceConfig.from_dict({"ratio_min": 0.5, "methods": ["l1", "l2"], "ignored": ["fc"]})
    assert config.methods == ("l1", "l2") and config.ignored == ("fc",)
    with pytest.raises(ValueError, match=r"unknown key 'ratio_mn' in \[space\]"):
        SpaceConfig.from_dict({"ratio_mn": 0.1})


def test_space_reads_its_config_and_from_model_takes_a_config(space):
    assert (space.ratio_min, space.ratio_step, space.methods) == (0.2, 0.1, ("l1", "fpgm"))
    assert space.config.methods is space.methods
    again = SearchSpace.from_model(ResNetStyle(widths=(16, 32), blocks=1), torch.randn(1, 3, 16, 16), space.config)
    assert again.config == space.config and again.group_names == space.group_names


def test_method_names_are_not_checked_by_the_space():
    # names belong to the evaluators' registries: search.config checks them
    assert SpaceConfig(methods=("magic",)).methods == ("magic",)


def test_policy_outside_space_is_refused(space):
    with pytest.raises(ValueError, match="unknown group name 'ghost'"):
        space.validate(Policy(ratios={"ghost": 0.5}))
    with pytest.raises(ValueError, match="unknown method 'lamp'"):
        space.validate(Policy(ratios={}, method="lamp"))
    with pytest.raises(ValueError, match="genes"):
        space.decode([0])


def test_uniform_sweep_spreads_uniform_policies_over_the_flops_budget():
    from tests.fakes import tiny_space

    space = tiny_space()
    sweep = space.uniform_sweep(4, max_flops_ratio=0.5)
    flops = [space.flops_ratio(p) for p in sweep]
    assert len(sweep) == 4 and len({p.key() for p in sweep}) == 4
    assert all(len(set(p.ratios.values())) == 1 and p.ratios[space.group_names[0]] in space.levels for p in sweep)
    assert flops == sorted(flops, reverse=True) and max(flops) <= 0.5
    largest = max(r for r in space.levels if space.flops_ratio(space.uniform(r)) <= 0.5)
    assert sweep[0].ratios[space.group_names[0]] == largest   # the budget's largest uniform model first
    assert sweep[-1].ratios[space.group_names[0]] == min(space.levels)
    assert space.uniform_sweep(0) == []
    assert len(space.uniform_sweep(1000)) <= len(space.levels)   # each grid ratio at most once
    with pytest.raises(ValueError, match="n must be"):
        space.uniform_sweep(-1)
