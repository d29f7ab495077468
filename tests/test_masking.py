"""Dynamic channel masking on the real digits task: FLOPs targets are met, ratios are learned."""

import numpy as np
import pytest

from evaluators.prune import apply_policy
from search.masking import MaskingOptions
from search.masking_core import MaskingConfig, learn_ratios, snap_to_target
from spaces.cost import count_cost


@pytest.fixture(scope="module")
def digits(digits_setup):
    task, model, space = digits_setup
    return task, model, space(0.1)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_exported_policy_meets_the_flops_target(digits, target):
    task, model, space = digits
    train = task.batches("train", 64, seed=0)
    heldout = task.batches("calibration", 64, seed=0)
    policy, info = learn_ratios(model, space, train, heldout, task.example_inputs,
                                MaskingConfig(target=target, steps=25, rerank_every=5, seed=0))
    pruned = apply_policy(model, policy, task.example_inputs, groups=space.groups)
    real = count_cost(pruned, task.example_inputs).flops / space.base_cost.flops
    assert abs(real - target) <= 0.03
    # the learned (continuous) ratios already sit near the target before snapping
    assert abs(info["learned_flops_ratio"] - target) <= 0.15
    # ratios are learned per group, not one uniform ratio
    assert len(set(policy.ratios.values())) > 1
    assert np.std(list(info["learned_ratios"].values())) > 0.01


@pytest.mark.parametrize("start", ["uniform", "global_magnitude"])
def test_a_run_starts_from_its_start_heuristics_allocation_at_the_target(digits, start):
    from evaluators.heuristics import heuristic_policies
    from search.masking_core import scale_to_target

    task, model, space = digits
    batches = task.batches("train", 64, seed=0)[:1]
    frozen = MaskingConfig(target=0.4, steps=1, ratio_lr=1e-9, weight_lr=1e-9, start=start, seed=0)
    _, info = learn_ratios(model, space, batches, batches, task.example_inputs, frozen)
    (heuristic,) = heuristic_policies(start, space, [0.4], model=model, example_inputs=task.example_inputs,
                                      on_grid=False)
    expected = scale_to_target(space, heuristic, 0.4)
    learned = info["learned_ratios"]
    assert learned == pytest.approx(dict(expected.ratios), abs=2e-3)   # the ratios hardly moved
    assert (len(set(round(r, 3) for r in learned.values())) > 1) == (start != "uniform")


def test_snap_to_target_moves_only_along_the_grid(digits):
    _, _, space = digits
    snapped = snap_to_target(space, space.uniform(0.63), 0.4, tolerance=0.01)
    assert all(r in space.levels for r in snapped.ratios.values())
    assert abs(space.flops_ratio(snapped) - 0.4) <= 0.01


def test_snap_below_never_exceeds_the_target_where_nearest_may(digits):
    _, _, space = digits
    over = 0
    for start in (0.2, 0.35, 0.5, 0.63, 0.8):
        for target in (0.15, 0.3, 0.45):
            below = space.flops_ratio(snap_to_target(space, space.uniform(start), target, 0.01, "below"))
            nearest = space.flops_ratio(snap_to_target(space, space.uniform(start), target, 0.01))
            assert target - 0.01 <= below <= target
            assert abs(nearest - target) <= 0.01
            over += nearest > target
    assert over > 0   # the symmetric snap does overshoot on this grid


@pytest.mark.parametrize("kwargs,match", [
    ({"snap": "up"}, "snap"), ({"target": 0.0}, "target"), ({"target": 1.5}, "target"), ({"lam": -1.0}, "lambda"),
    ({"steps": 0}, "steps"), ({"tau_start": 0.1, "tau_end": 1.0}, "tau"), ({"start": "magnitude"}, "masking start"),
])
def test_bad_masking_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskingConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"targets": (0.5, 1.2)}, "target"), ({"lambdas": (-0.5,)}, "lambda"), ({"steps": -3}, "steps"), ({"targets": ()}, "target"),
    ({"all_targets": "yes"}, "all_targets"), ({"starts": ["lamp"]}, "masking start must be one of global_lamp"),
    ({"starts": "uniform"}, "list of strings"), ({"starts": []}, "non-empty list"),
    ({"steps": [5, 0]}, "steps"), ({"steps": []}, "non-empty list"), ({"steps": [5, "30"]}, "steps"),
    ({"steps": 2.5}, "steps"),
])
def test_bad_searcher_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskingOptions(**kwargs)


def test_all_targets_proposes_one_rescaled_policy_per_target_from_each_run():
    from tests.fakes import Harness, tiny_space

    space = tiny_space()
    h = Harness(space)
    options = {"targets": [0.3, 0.5, 0.7], "steps": 3, "parallel": 1, "all_targets": True}
    done = h.run(h.searcher("masking", seed=0, options=options), 7)
    runs = [p.meta["masking_run"] for p in done]
    assert runs == [0, 0, 0, 1, 1, 1, 2]               # three targets per trained run, in run order
    for p in done[:3]:
        assert abs(space.flops_ratio(p.policy) - p.meta["masking_target"]) <= 0.06
    assert [p.meta["masking_target"] for p in done[:3]] == [0.3, 0.5, 0.7]
    assert all("masking_learned_at" in p.meta for p in done[1:3]) and "masking_learned_at" not in done[0].meta


def test_snap_below_keeps_every_proposal_of_a_run_within_its_target():
    from tests.fakes import Harness, tiny_space

    space = tiny_space()
    h = Harness(space)
    options = {"targets": [0.3, 0.5, 0.7], "steps": 3, "parallel": 1, "all_targets": True, "snap": "below"}
    done = h.run(h.searcher("masking", seed=0, options=options), 6)
    for p in done:
        assert p.meta["masking_target"] - 0.06 <= space.flops_ratio(p.policy) <= p.meta["masking_target"]


def test_runs_cycle_through_the_starts_after_targets_and_lambdas():
    from tests.fakes import Harness, tiny_space

    h = Harness(tiny_space())
    options = {"targets": [0.3, 0.5], "starts": ["uniform", "global_magnitude"], "steps": 2, "parallel": 1}
    done = h.run(h.searcher("masking", seed=0, options=options), 5)
    assert [(p.meta["masking_target"], p.meta["masking_start"]) for p in done] == [
        (0.3, "uniform"), (0.3, "global_magnitude"), (0.5, "uniform"), (0.5, "global_magnitude"), (0.3, "uniform")]
    assert [p.meta["masking_seed"] for p in done] == [0, 0, 0, 0, 1]   # the next cycle, the next seed


def test_runs_cycle_through_the_lengths_after_the_starts():
    from tests.fakes import Harness, tiny_space

    h = Harness(tiny_space())
    options = {"targets": [0.3], "starts": ["uniform", "global_magnitude"], "steps": [2, 3], "parallel": 1}
    done = h.run(h.searcher("masking", seed=0, options=options), 5)
    assert [(p.meta["masking_start"], p.meta["masking_steps"]) for p in done] == [
        ("uniform", 2), ("uniform", 3), ("global_magnitude", 2), ("global_magnitude", 3), ("uniform", 2)]
    assert [p.meta["masking_seed"] for p in done] == [0, 0, 0, 0, 1]


def test_one_length_or_a_list_of_lengths():
    assert MaskingOptions(steps=7).steps == (7,)
    assert MaskingOptions(steps=[5, 30]).steps == (5, 30)
    assert MaskingOptions(steps=[5, 30]).config(0.3, 20.0, seed=0).steps == 5
    assert MaskingOptions(steps=[5, 30]).config(0.3, 20.0, seed=0, steps=30).steps == 30


@pytest.mark.parametrize("model_name", ["tokens", "mha"])
def test_masking_learns_whole_heads_of_attention_models(model_name):
    """Head groups are masked a head at a time (hand-written attention, and
    nn.MultiheadAttention whose tuple output is masked too); the policy meets its target."""
    import torch

    from evaluators.tokens import TokenTransformer, generate_tokens
    from spaces.space import SearchSpace
    from tests.attention_models import MHAViT, tokens_input

    torch.manual_seed(0)
    if model_name == "tokens":
        model = TokenTransformer(dim=32, heads=4, head_dim=8, hidden=48, depth=2).eval()
        x, y = generate_tokens(96, seed=0)
    else:
        model = MHAViT().eval()
        x, y = torch.cat([tokens_input() for _ in range(96)]), torch.randint(0, 10, (96,))
    space = SearchSpace.from_model(model, x[:1], ratio_min=0.25)
    assert any(g.unit > 1 for g in space.groups)
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]
    policy, info = learn_ratios(model, space, batches[:2], batches[2:], x[:1],
                                MaskingConfig(target=0.5, steps=6, rerank_every=3, seed=0))
    pruned = apply_policy(model, policy, x[:1], groups=space.groups)
    assert pruned(x[:4]).shape[0] == 4
    assert abs(count_cost(pruned, x[:1]).flops / space.base_cost.flops - 0.5) <= 0.1


def test_masking_trains_with_the_tasks_loss_on_dict_inputs(tmp_path):
    """A language model on dict inputs (input_ids + attention_mask) scored by its own loss:
    masking calls the model with the batch's form and learns with the task's loss."""
    from evaluators.losses import task_distill, task_loss
    from evaluators.tasks import load_task
    from spaces.space import SearchSpace

    task = load_task("markov-lm", {"n_samples": 200, "epochs": 1}, cache_dir=tmp_path)
    model = task.base_model()
    space = SearchSpace.from_model(model, task.example_inputs, ratio_min=0.25)
    train = task.batches("train", 32, seed=0)
    heldout = task.batches("calibration", 32, seed=0)
    assert isinstance(train[0][0], dict)
    policy, info = learn_ratios(model, space, train, heldout, task.example_inputs,
                                MaskingConfig(target=0.5, steps=4, rerank_every=2, seed=0),
                                loss=task_loss(task), distill=task_distill(task))
    assert abs(space.flops_ratio(policy) - 0.5) <= 0.1 and info["final_loss"] == info["final_loss"]
