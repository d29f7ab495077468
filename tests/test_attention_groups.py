"""Attention heads as searched groups (``spaces.units``, ``evaluators.prune``) on an
``nn.MultiheadAttention`` transformer with a residual stream and on hand-written q/k/v/out
attention: random policies give models that run, keep the output shape, keep exactly the
asked heads and widths, and cost what the space predicts (FLOPs and params, exactly)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

from evaluators.prune import apply_policy
from spaces.cost import count_cost
from spaces.groups import out_channels
from spaces.policy import Policy
from spaces.space import SearchSpace
from tests.attention_models import CrossAttention, MHAViT, QKVViT, tokens_input

MODELS = {
    "mha": lambda: MHAViT(),
    "mha-seq-first": lambda: MHAViT(batch_first=False),
    "qkv": lambda: QKVViT(),
}
METHODS = ("l1", "l2", "fpgm", "lamp")


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    torch.manual_seed(0)
    model, example = MODELS[request.param]().eval(), tokens_input()
    return model, example, SearchSpace.from_model(model, example, ratio_min=0.25, ratio_step=0.05, methods=METHODS)


def heads_of(model: nn.Module) -> dict[str, int]:
    return {n: m.num_heads for n, m in model.named_modules() if hasattr(m, "num_heads")}


def test_every_attention_layer_is_counted_in_whole_heads(case):
    model, _, space = case
    counted = {c.module for g in space.groups for c in g.counts if c.attr == "num_heads"}
    assert counted == set(heads_of(model))
    for g in space.groups:
        assert g.width == out_channels(dict(model.named_modules())[g.name])
        assert all(c.size == 8 for c in g.counts)  # every test model has heads of 8


def test_random_policies_keep_the_asked_heads_and_cost_what_was_predicted(case):
    model, example, space = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shape = model(example).shape
    rng = np.random.default_rng(0)
    for i in range(12):
        policy = Policy(ratios=space.sample(rng).ratios, method=METHODS[i % len(METHODS)])
        pruned = apply_policy(model, policy, example, groups=space.groups)
        assert pruned(example).shape == shape
        kept, modules = space.kept(policy), dict(pruned.named_modules())
        for g in space.groups:
            assert out_channels(modules[g.name]) == kept[g.name] * g.unit
            for c in g.counts:
                assert getattr(modules[c.module], c.attr) == kept[g.name] * g.unit // c.size
        assert space.predict_cost(policy) == count_cost(pruned, example)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model was modified"


def test_the_smallest_model_of_the_space_is_predicted_exactly(case):
    model, example, space = case
    smallest = apply_policy(model, space.uniform(space.ratio_min), example, groups=space.groups)
    ratio = count_cost(smallest, example).flops / count_cost(model, example).flops
    assert space.min_flops_ratio == pytest.approx(ratio, rel=1e-12)  # what the reachability check reads
    assert max(heads_of(smallest).values()) < max(heads_of(model).values())


def test_multihead_attention_heads_are_the_residual_stream_in_whole_heads():
    model = MHAViT().eval()
    space = SearchSpace.from_model(model, tokens_input())
    stream = [g for g in space.groups if g.counts]
    assert len(stream) == 1 and {"embed", "blocks.0.attn", "blocks.1.attn"} <= set(stream[0].members)
    assert (stream[0].channels, stream[0].unit) == (4, 8)
    pruned = apply_policy(model, Policy(ratios={stream[0].name: 0.5}), tokens_input(), groups=space.groups)
    assert heads_of(pruned) == {"blocks.0.attn": 2, "blocks.1.attn": 2}
    assert pruned.blocks[0].attn.embed_dim == 16 and pruned.blocks[0].attn.head_dim == 8


def test_hand_written_heads_are_one_group_per_layer_apart_from_the_stream():
    model = QKVViT().eval()
    space = SearchSpace.from_model(model, tokens_input())
    heads = {c.module: g for g in space.groups for c in g.counts}
    assert sorted(heads) == ["blocks.0.attn", "blocks.1.attn"]
    assert [heads[n].channels for n in sorted(heads)] == [4, 6]
    assert {"blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj"} == set(heads["blocks.0.attn"].members)
    stream = [g for g in space.groups if "embed" in g.members]
    assert len(stream) == 1 and stream[0].unit == 1 and stream[0].channels == 32
    policy = Policy(ratios={heads["blocks.0.attn"].name: 0.25, heads["blocks.1.attn"].name: 0.5})
    pruned = apply_policy(model, policy, tokens_input(), groups=space.groups)
    assert heads_of(pruned) == {"blocks.0.attn": 1, "blocks.1.attn": 3}
    assert pruned.blocks[1].attn.out_proj.in_features == 24


def test_whole_heads_are_removed_from_q_k_v_and_out_together():
    model = QKVViT().eval()
    space = SearchSpace.from_model(model, tokens_input())
    group = next(g for g in space.groups if g.counts and g.counts[0].module == "blocks.0.attn")
    pruned = apply_policy(model, Policy(ratios={group.name: 0.5}), tokens_input(), groups=space.groups)
    old, new = model.blocks[0].attn, pruned.blocks[0].attn
    rows = {int(torch.nonzero((old.q_proj.weight == r).all(dim=1))) for r in new.q_proj.weight}
    kept_heads = sorted({r // 8 for r in rows})
    assert len(kept_heads) == 2 and rows == {h * 8 + j for h in kept_heads for j in range(8)}
    for name in ("k_proj", "v_proj"):
        expected = torch.cat([getattr(old, name).weight[h * 8:(h + 1) * 8] for h in kept_heads])
        assert torch.equal(getattr(new, name).weight, expected)
    expected = torch.cat([old.out_proj.weight[:, h * 8:(h + 1) * 8] for h in kept_heads], dim=1)
    assert torch.equal(new.out_proj.weight, expected)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_policy_rebuilds_for_export_and_reloads_its_weights(name):
    from search.export import rebuild_structure

    model, example = MODELS[name]().eval(), tokens_input()
    space = SearchSpace.from_model(model, example)
    policy = space.sample(np.random.default_rng(1))
    pruned = apply_policy(model, policy, example, groups=space.groups)

    class Task:  # what rebuild_structure reads of a task
        example_inputs = example

        @staticmethod
        def base_model():
            return MODELS[name]().eval()

    rebuilt = rebuild_structure(Task(), policy)  # groups rediscovered, as a fresh process does
    rebuilt.load_state_dict(pruned.state_dict())
    assert heads_of(rebuilt) == heads_of(pruned)
    assert torch.allclose(rebuilt.eval()(example), pruned(example))


@pytest.mark.parametrize("options", [{"bias": False}, {"add_bias_kv": True}], ids=["no-bias", "bias-kv"])
def test_multihead_attention_options_are_costed_exactly(options):
    model, example = CrossAttention(**options).eval(), tokens_input()
    space = SearchSpace.from_model(model, example, ratio_min=0.25)
    heads = [g for g in space.groups if g.counts]
    assert len(heads) == 1 and {"query", "memory", "attn"} <= set(heads[0].members)
    rng = np.random.default_rng(0)
    for _ in range(4):
        policy = space.sample(rng)
        pruned = apply_policy(model, policy, example, groups=space.groups)
        assert pruned.attn.num_heads == space.kept(policy)[heads[0].name]
        assert space.predict_cost(policy) == count_cost(pruned, example)


def test_multihead_attention_with_its_own_key_width_is_left_out_with_a_reason(caplog):
    model = CrossAttention(kv_dim=24).eval()
    with caplog.at_level(logging.INFO, logger="spaces.groups"):
        space = SearchSpace.from_model(model, tokens_input())
    assert not any(g.counts for g in space.groups)  # torch_pruning cannot prune a kdim != embed_dim layer
    assert "channel group 'memory' excluded: pruning it raised" in caplog.text
    assert space.base_cost == count_cost(model, tokens_input())
