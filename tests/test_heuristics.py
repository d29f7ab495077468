"""Search-free policies (uniform, Torch-Pruning global magnitude / LAMP): within the space and
the FLOPs target, faithful to MetaPruner, deterministic; and as the searchers' first proposals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp

from evaluators.heuristics import (
    GlobalRanking,
    available_heuristics,
    check_heuristic_start,
    group_scores,
    heuristic_policies,
    spread_targets,
    start_policies,
)
from search.base import build_options
from spaces.space import SearchSpace
from tests.fakes import Harness, tiny_space, tiny_task

GLOBAL = ("global_magnitude", "global_lamp")
TARGETS = (0.8, 0.5, 0.3, 0.15)


@pytest.fixture(scope="module")
def task():
    return tiny_task()


@pytest.fixture(scope="module")
def space():
    return tiny_space()


def _skewed(task):
    """The tiny model with 3/4 of features.1.0's channels (conv filters and BN scales) shrunk
    100x: layers differ in how their channel magnitudes spread, which is what global ranking reads."""
    model = task.base_model()
    with torch.no_grad():
        model.features[1][0].weight[8:] *= 0.01
        model.features[1][1].weight[8:] *= 0.01
    return model


def test_the_three_heuristics_are_registered():
    assert set(available_heuristics()) == {"uniform", "global_magnitude", "global_lamp"}


@pytest.mark.parametrize("name", available_heuristics())
def test_policies_are_in_the_space_on_the_grid_and_within_the_target(name, space, task):
    policies = heuristic_policies(name, space, TARGETS, model=task.base_model(), example_inputs=task.example_inputs)
    for target, policy in zip(TARGETS, policies):
        space.validate(policy)
        assert set(policy.ratios) == set(space.group_names)
        assert all(r in space.levels for r in policy.ratios.values())
        assert space.flops_ratio(policy) <= target + 1e-12


@pytest.mark.parametrize("name", GLOBAL)
def test_off_the_grid_the_ratios_are_kept_channels_within_the_range(name, space, task):
    (policy,) = heuristic_policies(name, space, [0.3], model=task.base_model(), example_inputs=task.example_inputs,
                                   on_grid=False)
    kept = space.kept(policy)
    for g in space.groups:
        assert space.ratio_min <= policy.ratio(g.name) <= space.ratio_max
        assert policy.ratio(g.name) == pytest.approx(kept[g.name] / g.channels)
    assert space.flops_ratio(policy) <= 0.3


@pytest.mark.parametrize("name", GLOBAL)
def test_global_pruning_differs_from_uniform_where_layers_differ(name, space, task):
    model = _skewed(task)
    (policy,) = heuristic_policies(name, space, [0.5], model=model, example_inputs=task.example_inputs)
    ratios = dict(policy.ratios)
    assert len(set(ratios.values())) > 1
    assert ratios["features.1.0"] == min(ratios.values())  # its shrunk filters go first
    (uniform,) = heuristic_policies("uniform", space, [0.5])
    assert policy != uniform


def test_magnitude_and_lamp_rank_differently(space, task):
    model = _skewed(task)
    mag, lamp = (heuristic_policies(n, space, [0.4], model=model, example_inputs=task.example_inputs)[0]
                 for n in GLOBAL)
    assert mag != lamp


@pytest.mark.parametrize("name", GLOBAL)
def test_bisection_is_monotone_minimal_and_deterministic(name, space, task):
    importance = (tp.importance.MagnitudeImportance(p=2, normalizer="mean") if name == "global_magnitude"
                  else tp.importance.LAMPImportance(p=2))
    ranking = GlobalRanking(space, group_scores(space, task.base_model(), task.example_inputs, importance))
    flops = [space.flops_ratio(ranking.policy(k)) for k in range(len(ranking.all) + 1)]
    assert all(a >= b for a, b in zip(flops, flops[1:]))  # more removed channels, fewer FLOPs
    targets = [0.9, 0.7, 0.5, 0.3, 0.2, 0.1]
    first = heuristic_policies(name, space, targets, model=task.base_model(), example_inputs=task.example_inputs)
    again = heuristic_policies(name, space, targets, model=task.base_model(), example_inputs=task.example_inputs)
    assert first == again
    for a, b in zip(first, first[1:]):  # a lower target never keeps more of any group
        assert all(b.ratio(g) <= a.ratio(g) for g in space.group_names)
    for t in targets:  # the least pruning meeting the target: one channel less pruned misses it
        k = next(k for k, f in enumerate(flops) if f <= t + 1e-12)
        assert ranking.within(t) == ranking.policy(k)
        assert k == 0 or flops[k - 1] > t


def test_scores_are_torch_pruning_metapruner_global_pruning(task):
    """Off the grid, with a range that does not bind, the kept channels are MetaPruner's."""
    space = SearchSpace.from_model(task.base_model(), task.example_inputs, ratio_min=0.05, ratio_step=0.05)
    importance = tp.importance.MagnitudeImportance(p=2, normalizer="mean")
    ranking = GlobalRanking(space, group_scores(space, task.base_model(), task.example_inputs, importance),
                            on_grid=False)
    total = len(ranking.all)
    for pruning_ratio in (0.3, 0.6):
        model = task.base_model()
        pruner = tp.pruner.MetaPruner(model, task.example_inputs, importance=importance, global_pruning=True,
                                      pruning_ratio=pruning_ratio, ignored_layers=[model.head])
        pruner.step()
        k = total - int(total * (1 - pruning_ratio))
        ours = space.kept(ranking.policy(k))
        modules = dict(model.named_modules())
        theirs = {g.name: modules[g.name].weight.shape[0] for g in space.groups}
        assert ours == theirs


def test_only_the_spaces_groups_are_pruned(task):
    space = SearchSpace.from_model(task.base_model(), task.example_inputs, ignored=("features.0.0",))
    (policy,) = heuristic_policies("global_lamp", space, [0.4], model=task.base_model(),
                                   example_inputs=task.example_inputs)
    assert "features.0.0" not in policy.ratios and set(policy.ratios) == set(space.group_names)


def test_the_model_is_left_unchanged(space, task):
    model = task.base_model()
    before = copy.deepcopy(model.state_dict())
    heuristic_policies("global_magnitude", space, [0.3], model=model, example_inputs=task.example_inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_criterion_is_l2_when_the_space_offers_it(task):
    space = tiny_space(methods=("l1", "l2"))
    (policy,) = heuristic_policies("global_lamp", space, [0.4], model=task.base_model(),
                                   example_inputs=task.example_inputs)
    assert policy.method == "l2"


@pytest.mark.parametrize("target, message", [
    (0.01, "below what the space can reach"), (0.0, "must be a number in (0, 1]"), (1.5, "must be a number in (0, 1]"),
    ("half", "must be a number in (0, 1]"), (True, "must be a number in (0, 1]"),
])
@pytest.mark.parametrize("name", available_heuristics())
def test_bad_targets_are_one_line_errors(name, target, message, space, task):
    with pytest.raises(ValueError) as info:
        heuristic_policies(name, space, [target], model=task.base_model(), example_inputs=task.example_inputs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_heuristic_and_missing_model_are_errors(space):
    with pytest.raises(ValueError, match="unknown heuristic 'global_l1'"):
        heuristic_policies("global_l1", space, [0.5])
    with pytest.raises(ValueError, match="need the base model"):
        heuristic_policies("global_lamp", space, [0.5])


def test_start_policies_spread_over_the_budget_largest_first(space, task):
    targets = spread_targets(space, 3, 0.6)
    step = (0.6 - space.min_flops_ratio) / 3
    assert targets == pytest.approx([0.6, 0.6 - step, 0.6 - 2 * step])
    starts = start_policies({"global_lamp": 3, "uniform": 2}, space, 0.6, task)
    lamp = heuristic_policies("global_lamp", space, targets, model=task.base_model(),
                              example_inputs=task.example_inputs)
    assert starts[:3] == lamp
    assert starts[3:] == [p for p in heuristic_policies("uniform", space, spread_targets(space, 2, 0.6))
                          if p not in lamp]
    assert start_policies({}, space, 0.6) == []
    with pytest.raises(ValueError, match="needs the study's task"):
        start_policies({"global_lamp": 2}, space, 0.6, None)


@pytest.mark.parametrize("value, message", [
    (["global_lamp"], "must be a table of heuristic name -> count"), ("global_lamp", "must be a table"),
    ({"lamp": 2}, "unknown heuristic 'lamp' (known: global_lamp, global_magnitude, uniform)"),
    ({"global_lamp": 0}, "heuristic_start.global_lamp must be an integer >= 1, got 0"),
    ({"global_lamp": 1.5}, "heuristic_start.global_lamp must be an integer"),
])
@pytest.mark.parametrize("kind", ["tpe", "nsga2", "genetic"])
def test_the_option_is_validated(kind, value, message):
    with pytest.raises(ValueError) as info:
        build_options(kind, {"heuristic_start": value})
    assert message in str(info.value) and "\n" not in str(info.value) and kind in str(info.value)
    assert check_heuristic_start("x", {"global_lamp": 2}) == {"global_lamp": 2}


@pytest.mark.parametrize("kind", ["tpe", "nsga2"])
def test_optuna_searchers_propose_the_heuristic_policies_first(kind, space, task):
    h = Harness(space)  # max_flops_ratio 0.6
    spec = {"global_magnitude": 2, "global_lamp": 2}
    done = h.run(h.searcher(kind, seed=1, options={"uniform_start": 2, "heuristic_start": spec}), 9)
    uniform = space.uniform_sweep(2, max_flops_ratio=0.6)
    heuristic = [p for p in start_policies(spec, space, 0.6, task) if p not in uniform]
    expected = uniform + heuristic
    assert len(heuristic) >= 3
    assert [p.policy for p in done[: len(expected)]] == expected
    assert any(p.policy not in expected for p in done[len(expected):])  # then the sampler's own


def test_the_genetic_searcher_seeds_its_first_generation(space, task):
    h = Harness(space)
    spec = {"global_lamp": 3}
    searcher = h.searcher("genetic", seed=1, options={"heuristic_start": spec, "sensitivity_ratios": [],
                                                      "population": 4})
    done = h.run(searcher, 4)
    starts = start_policies(spec, space, 0.6, task)
    assert len(starts) == 3
    assert [p.policy for p in done[:3]] == starts and all(p.generation == 0 for p in done)
    assert done[3].policy not in starts


@pytest.mark.parametrize("name", ["global_magnitude", "global_lamp"])
def test_global_pruning_ranks_whole_heads_of_attention_models(name):
    """Head groups are scored per head (its channels' mean): the policies prune real models
    whose head counts are what the space predicts."""
    from evaluators.prune import apply_policy
    from spaces.cost import count_cost
    from tests.attention_models import QKVViT, tokens_input

    torch.manual_seed(0)
    model, x = QKVViT().eval(), tokens_input()
    space = SearchSpace.from_model(model, x, ratio_min=0.25)
    heads = [g for g in space.groups if g.unit > 1]
    assert heads
    for policy in heuristic_policies(name, space, [0.4, 0.7], model=model, example_inputs=x):
        pruned = apply_policy(model, policy, x, groups=space.groups)
        assert count_cost(pruned, x).flops == space.predict_cost(policy).flops


def test_a_head_without_weights_scores_lowest_of_its_layer():
    from evaluators.heuristics import group_scores
    from tests.attention_models import QKVViT, tokens_input

    torch.manual_seed(0)
    model, x = QKVViT().eval(), tokens_input()
    attn = model.blocks[0].attn
    with torch.no_grad():   # head 2 of the first layer: no q/k/v weights
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.weight[2 * attn.head_dim:3 * attn.head_dim] = 0
            proj.bias[2 * attn.head_dim:3 * attn.head_dim] = 0
        attn.out_proj.weight[:, 2 * attn.head_dim:3 * attn.head_dim] = 0
    space = SearchSpace.from_model(model, x, ratio_min=0.25)
    group = next(g for g in space.groups if g.unit > 1 and g.name.startswith("blocks.0."))
    scores = group_scores(space, model, x, tp.importance.GroupMagnitudeImportance(p=2))[group.name]
    assert len(scores) == group.channels == 4 and int(scores.argmin()) == 2 and scores[2] == 0
