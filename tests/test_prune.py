"""apply_policy + predict_cost on five coupling patterns, 20 random policies each."""

import numpy as np
import pytest
import torch

from evaluators.prune import apply_policy
from spaces.cost import count_cost
from spaces.groups import out_channels
from spaces.policy import Policy
from spaces.space import SearchSpace, kept_channels
from tests.architectures import ARCHITECTURES


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def case(request):
    torch.manual_seed(0)
    cls, make_input = ARCHITECTURES[request.param]
    model = cls().eval()
    example = make_input()
    space = SearchSpace.from_model(model, example, ratio_min=0.1, ratio_step=0.05, methods=("l1", "l2", "fpgm", "lamp", "bn_scale"))
    return model, example, space


def test_random_policies_prune_exactly_and_costs_match(case):
    model, example, space = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out_shape = model(example).shape
    rng = np.random.default_rng(0)
    methods = space.methods
    for i in range(20):
        policy = space.sample(rng)
        policy = Policy(ratios=policy.ratios, method=methods[i % len(methods)])
        pruned = apply_policy(model, policy, example, groups=space.groups)
        assert pruned(example).shape == out_shape
        modules = dict(pruned.named_modules())
        for g in space.groups:
            assert out_channels(modules[g.name]) == kept_channels(g.channels, policy.ratio(g.name))
        predicted, counted = space.predict_cost(policy), count_cost(pruned, example)
        assert predicted.flops == pytest.approx(counted.flops, rel=0.01)
        assert predicted.params == pytest.approx(counted.params, rel=0.01)
        assert counted.flops < space.base_cost.flops or all(r == 1.0 for r in policy.ratios.values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "input model was modified"


def test_uniform_one_leaves_the_model_identical(case):
    model, example, space = case
    pruned = apply_policy(model, space.uniform(1.0), example, groups=space.groups)
    assert pruned is not model
    assert torch.equal(pruned(example), model(example))


def test_round_to_is_honoured(case):
    model, example, space = case
    pruned = apply_policy(model, space.uniform(0.45), example, groups=space.groups, round_to=4)
    modules = dict(pruned.named_modules())
    for g in space.groups:
        assert out_channels(modules[g.name]) == kept_channels(g.channels, 0.45, 4)


def test_lowest_scored_channels_are_removed():
    from tests.architectures import PlainCNN
    model = PlainCNN().eval()
    example = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        w = model.features[0][0].weight
        w.mul_(0.01)
        w[:4] *= 1000  # channels 0..3 have by far the largest L1 norm
    space = SearchSpace.from_model(model, example, ratio_min=0.1)
    pruned = apply_policy(model, Policy(ratios={"features.0.0": 0.25}, method="l1"), example, groups=space.groups)
    kept = pruned.features[0][0].weight
    assert torch.allclose(kept, model.features[0][0].weight[:4])


def test_taylor_without_calibration_is_refused(case):
    model, example, space = case
    with pytest.raises(ValueError, match="needs calibration"):
        apply_policy(model, space.uniform(0.5, method="taylor"), example, groups=space.groups)


def test_taylor_with_calibration_prunes():
    from tests.architectures import PlainCNN
    model = PlainCNN().eval()
    example = torch.randn(1, 3, 16, 16)
    calib = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))]
    space = SearchSpace.from_model(model, example, ratio_min=0.1)
    pruned = apply_policy(model, space.uniform(0.5, method="taylor"), example, calib, groups=space.groups)
    assert pruned(example).shape == (1, 10)
    assert all(p.grad is None for p in model.parameters())


def test_unknown_group_and_method_are_named(case):
    model, example, space = case
    with pytest.raises(ValueError, match="unknown group name 'ghost'"):
        apply_policy(model, Policy(ratios={"ghost": 0.5}), example, groups=space.groups)
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        apply_policy(model, Policy(ratios={}, method="magic"), example, groups=space.groups)


def test_differentiable_flops_match_integer_prediction(case):
    model, example, space = case
    policy = space.sample(np.random.default_rng(3))
    kept = space.kept(policy)
    k = torch.tensor([float(kept[n]) for n in space.group_names], requires_grad=True)
    flops = space.cost_model.flops_torch(k)
    assert flops.item() == pytest.approx(space.predict_cost(policy).flops, rel=1e-9)
    flops.backward()
    assert (k.grad >= 0).all() and k.grad.sum() > 0  # keeping more channels never costs less


def test_flops_by_layer_kind_add_up_to_the_exact_flops(case):
    model, example, space = case
    policy = space.sample(np.random.default_rng(4))
    by_kind = space.cost_model.flops_by_kind(space.kept(policy))
    assert sum(by_kind.values()) == pytest.approx(space.predict_cost(policy).flops, rel=1e-9)
    has_depthwise = any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
                        for m in model.modules())
    assert ("depthwise" in by_kind) == has_depthwise
