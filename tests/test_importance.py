"""Contract suite every importance criterion passes (parametrized over the registry, like
Optuna's samplers_tests), plus what is specific to Taylor, Shapley and the method as a
searched dimension."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from search.params import distributions
from evaluators.importance import IMPORTANCES, Importance, available_importances, make_importance, needs_calibration
from evaluators.prune import apply_policy
from evaluators.shapley import ChannelMask, ForwardSchedule, ShapleyImportance
from evaluators.tasks import load_task
from spaces.groups import build_graph, discover_groups, out_channels, root_pruning_group
from spaces.policy import Policy
from spaces.space import METHOD_PARAM, SearchSpace, SpaceConfig, kept_channels
from tests.architectures import ARCHITECTURES

CACHE = Path(__file__).resolve().parents[1] / "studies" / "cache"
BUILTINS = {"l1", "l2", "bn_scale", "fpgm", "lamp", "taylor", "taylor_bn", "shapley"}
# Cheap options for the slow criteria; the defaults are exercised by test_default_factory.
FAST = {"shapley": {"samples": 1, "max_samples": 16, "cache": False}}

parametrize_importance = pytest.mark.parametrize("name", available_importances())


def make(name: str, **options) -> Importance:
    return make_importance(name, **{**FAST.get(name, {}), **options})


def use_cheap_options(monkeypatch, name):
    """Make criterion ``name`` built with default options (as apply_policy does) use FAST's."""
    cls = IMPORTANCES.get(name)
    cheap = type(cls.__name__, (cls,), {"__init__": lambda self: cls.__init__(self, **FAST[name])})
    monkeypatch.setitem(IMPORTANCES._entries, name, cheap)


def score_groups(importance: Importance, model: nn.Module, example, groups, calibration, order=None):
    """Scores of every group, computed as apply_policy does (prepare once, then full groups)."""
    importance.prepare(model, calibration)
    graph = build_graph(model, example)
    modules = dict(model.named_modules())
    names = order or [g.name for g in groups]
    return {n: importance.score(root_pruning_group(graph, modules[n], range(out_channels(modules[n])))) for n in names}


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    task = load_task("digits", cache_dir=CACHE)
    base = task.base_model()
    groups = discover_groups(base, task.example_inputs)
    calibration = task.batches("calibration", 32, limit=64, seed=0)
    return task, base, groups, calibration


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request):
    torch.manual_seed(0)
    cls, make_input = ARCHITECTURES[request.param]
    model = cls().eval()
    example = make_input()
    groups = discover_groups(model, example)
    gen = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(8, *example.shape[1:], generator=gen), torch.randint(0, 10, (8,), generator=gen))
                   for _ in range(2)]
    return model, example, groups, calibration


# -- the contract -------------------------------------------------------------------------------
def test_registry_has_the_builtins():
    assert BUILTINS <= set(available_importances())
    for name in ("taylor", "taylor_bn", "shapley"):
        assert needs_calibration(name)


@parametrize_importance
def test_default_factory(name):
    assert isinstance(make_importance(name), Importance)


@parametrize_importance
def test_one_finite_score_per_channel(name, arch):
    model, example, groups, calibration = arch
    work = copy.deepcopy(model)
    scores = score_groups(make(name), work, example, groups, calibration)
    for g in groups:
        s = scores[g.name]
        assert isinstance(s, torch.Tensor) and s.shape == (g.channels,), g.name
        assert torch.isfinite(s).all(), g.name
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), work.state_dict().values())), \
        "scoring changed the weights"
    assert all(p.grad is None for p in work.parameters()), "gradients were left behind"


@parametrize_importance
def test_deterministic_under_a_seed(name, digits):
    task, base, groups, calibration = digits
    groups = groups[:3]
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(score_groups(make(name), copy.deepcopy(base), task.example_inputs, groups, calibration))
    for g in groups:
        assert torch.equal(runs[0][g.name], runs[1][g.name]), g.name


@parametrize_importance
def test_low_scored_channels_matter_less_than_high_scored(name, digits):
    """Removing each group's lowest-scored half hurts the validation loss less, on average
    over the groups, than removing its highest-scored half (no recovery). Removal is done
    by the channel mask, which test_channel_mask_matches_real_removal checks against real
    pruning (and is ~10x cheaper than pruning a copy per group)."""
    task, base, groups, calibration = digits
    scores = score_groups(make(name), copy.deepcopy(base), task.example_inputs, groups, calibration)
    x, y = task.validation
    x, y = x[:160], y[:160]
    losses = {"low": [], "high": []}
    for g in groups:
        order = torch.argsort(scores[g.name].double(), stable=True)
        k = g.channels // 2
        with torch.no_grad(), ChannelMask(_group(base, task.example_inputs, g.name), g.channels) as masker:
            for which, idxs in (("low", order[:k]), ("high", order[-k:])):
                masker.mask.fill_(1.0)
                masker.mask[idxs] = 0.0
                losses[which].append(F.cross_entropy(base(x), y).item())
    assert np.mean(losses["low"]) < np.mean(losses["high"]), losses


@parametrize_importance
def test_apply_policy_prunes_with_every_criterion(name, digits, monkeypatch):
    task, base, groups, calibration = digits
    if name in FAST:  # apply_policy builds criteria with default options: make them cheap here
        use_cheap_options(monkeypatch, name)
    policy = Policy(ratios={g.name: 0.5 for g in groups}, method=name)
    pruned = apply_policy(base, policy, task.example_inputs, calibration, groups=groups)
    modules = dict(pruned.named_modules())
    assert all(out_channels(modules[g.name]) == kept_channels(g.channels, 0.5) for g in groups)
    assert pruned(task.example_inputs).shape == base(task.example_inputs).shape


@pytest.mark.parametrize("name", [n for n in available_importances() if needs_calibration(n)])
def test_data_driven_criteria_refuse_to_run_without_calibration(name, digits):
    task, base, groups, _ = digits
    with pytest.raises(ValueError, match="calibration") as err:
        make(name).prepare(copy.deepcopy(base), [])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="calibration"):
        apply_policy(base, Policy(ratios={groups[0].name: 0.5}, method=name), task.example_inputs, None, groups=groups)


@pytest.mark.parametrize("name", [n for n in available_importances() if needs_calibration(n)])
def test_a_group_of_another_model_is_refused(name, digits):
    task, base, groups, calibration = digits
    imp = make(name)
    imp.prepare(copy.deepcopy(base), calibration)
    with pytest.raises(ValueError, match="prepare"):
        imp.score(_group(base, task.example_inputs, groups[0].name))


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        make_importance("nope")


# -- Taylor --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["taylor", "taylor_bn"])
def test_taylor_is_accumulated_per_batch(name, digits):
    """Molchanov: the per-batch squared first-order terms are averaged, so two batches score
    the mean of their separate scores (a summed-gradient estimate would not)."""
    task, base, groups, calibration = digits
    a, b = calibration[:1], calibration[1:2]
    both = score_groups(make(name), copy.deepcopy(base), task.example_inputs, groups, a + b)
    sa = score_groups(make(name), copy.deepcopy(base), task.example_inputs, groups, a)
    sb = score_groups(make(name), copy.deepcopy(base), task.example_inputs, groups, b)
    for g in groups:
        torch.testing.assert_close(both[g.name], (sa[g.name] + sb[g.name]) / 2, rtol=1e-4, atol=0)
        assert not torch.allclose(sa[g.name], sb[g.name])


def test_taylor_bn_uses_the_bn_gate(digits):
    task, base, groups, calibration = digits
    weights = score_groups(make("taylor"), copy.deepcopy(base), task.example_inputs, groups, calibration)
    gates = score_groups(make("taylor_bn"), copy.deepcopy(base), task.example_inputs, groups, calibration)
    assert any(not torch.allclose(weights[g.name], gates[g.name]) for g in groups)


def test_taylor_bn_falls_back_to_weights_without_bn(caplog):
    cls, make_input = ARCHITECTURES["token_mlp"]  # Linear + LayerNorm only
    torch.manual_seed(0)
    model, example = cls().eval(), make_input()
    groups = discover_groups(model, example)
    calibration = [(torch.randn(8, *example.shape[1:]), torch.randint(0, 10, (8,)))]
    weights = score_groups(make("taylor"), copy.deepcopy(model), example, groups, calibration)
    with caplog.at_level(logging.INFO, logger="evaluators.importance"):
        gates = score_groups(make("taylor_bn"), copy.deepcopy(model), example, groups, calibration)
    assert "no BatchNorm gate" in caplog.text
    for g in groups:
        torch.testing.assert_close(gates[g.name], weights[g.name])


# -- Shapley -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, match",
    [({"samples": 0}, "samples"), ({"samples": -2}, "samples"), ({"samples": 1.5}, "samples"),
     ({"samples": True}, "samples"), ({"truncation": -0.1}, "truncation"), ({"max_samples": 0}, "max_samples"),
     ({"seed": -1}, "seed"), ({"bogus": 1}, "unknown shapley option")],
)
def test_shapley_bad_options(options, match):
    with pytest.raises(ValueError, match=match) as err:
        make_importance("shapley", **options)
    assert "\n" not in str(err.value)


def _group(model, example, name):
    graph = build_graph(model, example)
    root = dict(model.named_modules())[name]
    return root_pruning_group(graph, root, range(out_channels(root)))


def test_shapley_efficiency_without_truncation(digits):
    """Untruncated walks telescope: a group's scores sum to L(all removed) - L(full).

    L(all removed) is computed independently of the masking code, by zeroing the BN that
    gates the group (block2.conv1 -> bn -> relu -> block2.conv2)."""
    task, base, groups, calibration = digits
    name = "block2.conv1.0"
    assert name in {g.name for g in groups}
    imp = make("shapley", truncation=None, samples=2)
    model = copy.deepcopy(base)
    imp.prepare(model, calibration)
    scores = imp.score(_group(model, task.example_inputs, name))
    x, y = imp._x, imp._y
    with torch.no_grad():
        full = F.cross_entropy(base(x), y).item()
        off = copy.deepcopy(base)
        bn = dict(off.named_modules())["block2.conv1.1"]
        bn.weight.zero_()
        bn.bias.zero_()
        removed = F.cross_entropy(off(x), y).item()
    assert float(scores.sum()) == pytest.approx(removed - full, rel=1e-4, abs=1e-5)


def test_shapley_truncation_saves_forward_passes(digits):
    task, base, groups, calibration = digits
    name = "block4.conv1.0"
    passes = {}
    for truncation in (None, 0.5):
        imp = make("shapley", truncation=truncation)
        model = copy.deepcopy(base)
        imp.prepare(model, calibration)
        scores = imp.score(_group(model, task.example_inputs, name))
        passes[truncation] = imp.forward_passes
        assert torch.isfinite(scores).all()
    assert passes[0.5] < passes[None]


def test_shapley_seed_changes_the_permutations(digits):
    task, base, groups, calibration = digits
    name = "block1.conv1.0"
    s0, s1 = (make("shapley", seed=seed, truncation=None) for seed in (0, 1))
    model = copy.deepcopy(base)
    for imp in (s0, s1):
        imp.prepare(model, calibration)
    group = _group(model, task.example_inputs, name)
    a, b = s0.score(group), s1.score(group)
    assert not torch.equal(a, b)
    assert float(a.sum()) == pytest.approx(float(b.sum()), rel=1e-4)  # same total either way


def test_shapley_scores_do_not_depend_on_group_order(digits):
    task, base, groups, calibration = digits
    names = [g.name for g in groups[:3]]
    forward = score_groups(make("shapley"), copy.deepcopy(base), task.example_inputs, groups, calibration, names)
    backward = score_groups(make("shapley"), copy.deepcopy(base), task.example_inputs, groups, calibration, names[::-1])
    for n in names:
        assert torch.equal(forward[n], backward[n])


def test_shapley_cache_reuses_scores_for_identical_weights_and_data(digits):
    task, base, groups, calibration = digits
    ShapleyImportance.clear_cache()
    name = "block1.conv1.0"
    first = make("shapley", cache=True)
    model = copy.deepcopy(base)
    first.prepare(model, calibration)
    a = first.score(_group(model, task.example_inputs, name))
    assert first.cache_hits == 0 and first.forward_passes > 0
    again = make("shapley", cache=True)
    model = copy.deepcopy(base)
    again.prepare(model, calibration)
    b = again.score(_group(model, task.example_inputs, name))
    assert torch.equal(a, b) and again.cache_hits == 1 and again.forward_passes == 0
    with torch.no_grad():
        model.stem[0].weight.mul_(1.5)  # other weights -> other game -> recomputed
    changed = make("shapley", cache=True)
    changed.prepare(model, calibration)
    changed.score(_group(model, task.example_inputs, name))
    assert changed.cache_hits == 0 and changed.forward_passes > 0
    ShapleyImportance.clear_cache()


def test_channel_mask_matches_real_removal(digits):
    """Zeroing channels through the mask hooks gives the same outputs as removing them."""
    task, base, groups, calibration = digits
    x = calibration[0][0]
    for g in groups:
        drop = list(range(0, g.channels, 3))
        model = copy.deepcopy(base)
        with torch.no_grad(), ChannelMask(_group(model, task.example_inputs, g.name), g.channels) as masker:
            masker.mask[drop] = 0.0
            masked = model(x)
        pruned = copy.deepcopy(base)
        root_pruning_group(build_graph(pruned, task.example_inputs), dict(pruned.named_modules())[g.name], drop).prune()
        with torch.no_grad():
            torch.testing.assert_close(masked, pruned(x), rtol=1e-4, atol=1e-4)


class _SharedAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.c(self.act(self.b(self.act(self.a(x)))))


def test_forward_schedule_never_skips_shared_modules():
    model = _SharedAct()
    schedule = ForwardSchedule(model, lambda: model(torch.randn(2, 4)))
    skippable = schedule.skippable(schedule.start([model.c]))
    assert model.a in skippable and model.b in skippable
    assert model.act not in skippable  # called twice: replaying it would return the wrong call


# -- the method as a search dimension --------------------------------------------------------------
def test_global_method_is_one_categorical_over_every_criterion(digits):
    task, base, groups, _ = digits
    space = SearchSpace(groups=tuple(groups), config=SpaceConfig(ratio_min=0.1, methods=available_importances()))
    dists = distributions(space)
    assert list(dists[METHOD_PARAM].choices) == list(available_importances())
    assert not any(k.endswith(f".{METHOD_PARAM}") for k in dists)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask(dists)
        policy = space.from_params(trial.params)
        assert isinstance(policy.method, str) and policy.method in available_importances()
        seen.add(policy.method)
        study.tell(trial, 0.0)
    assert len(seen) > 1


def test_per_group_methods_decode_and_prune(digits, monkeypatch):
    task, base, groups, calibration = digits
    # keep shapley cheap for the pruning below (apply_policy uses default options)
    use_cheap_options(monkeypatch, "shapley")
    space = SearchSpace(groups=tuple(groups), config=SpaceConfig(ratio_min=0.1, methods=available_importances(),
                                                             method_per_group=True))
    dists = distributions(space)
    for g in groups:
        assert list(dists[f"{g.name}.{METHOD_PARAM}"].choices) == list(available_importances())
    rng = np.random.default_rng(0)
    for _ in range(3):
        policy = space.sample(rng)
        assert isinstance(policy.method, dict) or hasattr(policy.method, "items")
        assert space.decode(space.encode(policy)) == policy
        assert space.from_params(space.to_params(policy)) == policy
        pruned = apply_policy(base, policy, task.example_inputs, calibration, groups=groups)
        assert pruned(task.example_inputs).shape == (1, task.num_classes)


def test_per_group_method_needs_the_space_flag(digits):
    task, base, groups, _ = digits
    space = SearchSpace(groups=tuple(groups), config=SpaceConfig(ratio_min=0.1, methods=("l1", "taylor")))
    with pytest.raises(ValueError, match="method_per_group"):
        space.validate(Policy(ratios={}, method={groups[0].name: "taylor"}))
