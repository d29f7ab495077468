"""Hugging Face ViT, BERT and Llama attention (``spaces.units``): random policies over heads
and widths give models that run, keep the output shape, keep exactly the asked head counts
and widths, and cost what the space predicts (FLOPs and params, exactly). Llama's heads are
left out with a logged reason (rotary q/k); its MLP widths and residual stream are searched."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tests.hf_models import build, example_input  # skips without transformers

from evaluators.prune import apply_policy  # noqa: E402
from spaces.cost import count_cost  # noqa: E402
from spaces.groups import out_channels  # noqa: E402
from spaces.policy import Policy  # noqa: E402
from spaces.space import SearchSpace  # noqa: E402

ARCHS = ("vit", "bert", "llama")
# the attention module of each layer, and the attributes its forward or its readers use
ATTENTION = {"vit": "model.vit.layers.{}.attention", "bert": "model.bert.encoder.layer.{}.attention.self",
             "llama": "model.model.layers.{}.self_attn"}


@pytest.fixture(scope="module", params=ARCHS)
def case(request):
    model, example = build(request.param), example_input(request.param)
    return request.param, model, example, SearchSpace.from_model(model, example, ratio_min=0.25, ratio_step=0.05,
                                                                      methods=("l1", "l2", "fpgm"))


def head_groups(space: SearchSpace) -> dict[str, str]:
    """attention module -> the group of its heads"""
    return {c.module: g.name for g in space.groups for c in g.counts if c.attr == "num_attention_heads"}


def q_heads(model, arch: str, layer: int) -> int:
    attn = model.get_submodule(ATTENTION[arch].format(layer))
    q = attn.q_proj if arch != "bert" else attn.query
    return q.out_features // (attn.attention_head_size if arch == "bert" else attn.head_dim)


def test_heads_of_vit_and_bert_are_one_group_per_layer_llama_heads_left_out(case, caplog):
    arch, model, example, space = case
    heads = head_groups(space)
    if arch == "llama":
        assert heads == {}
        with caplog.at_level(logging.INFO, logger="spaces.groups"):
            SearchSpace.from_model(model, example)
        assert "heads of 'model.model.layers.0.self_attn' left out: its q/k are rotated" in caplog.text
    else:
        assert sorted(heads) == [ATTENTION[arch].format(i) for i in range(2)]
        assert all(g.unit == 8 and g.channels == 4 for g in space.groups if g.name in heads.values())
    mlp = [g for g in space.groups if not g.counts and g.channels == 64]
    assert len(mlp) == 2  # each layer's MLP hidden width
    assert any(g.channels == 32 and len(g.members) > 4 for g in space.groups)  # the residual stream


def test_random_policies_keep_the_asked_heads_and_cost_what_was_predicted(case):
    arch, model, example, space = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shape = model(example).shape
    rng = np.random.default_rng(0)
    for i in range(6):
        policy = Policy(ratios=space.sample(rng).ratios, method=("l1", "l2", "fpgm")[i % 3])
        pruned = apply_policy(model, policy, example, groups=space.groups)
        with torch.no_grad():
            assert pruned(example).shape == shape
        kept, modules = space.kept(policy), dict(pruned.named_modules())
        for g in space.groups:
            assert out_channels(modules[g.name]) == kept[g.name] * g.unit
            for c in g.counts:
                assert getattr(modules[c.module], c.attr) == kept[g.name] * g.unit // c.size
        for module, group in head_groups(space).items():
            layer = int(module.split(".")[-2 if arch == "vit" else -3])
            assert q_heads(pruned, arch, layer) == kept[group] == pruned.get_submodule(module).num_attention_heads
        if arch == "bert":
            attn = pruned.get_submodule(ATTENTION[arch].format(0))
            assert attn.all_head_size == attn.query.out_features == attn.num_attention_heads * 8
        assert space.predict_cost(policy) == count_cost(pruned, example)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model was modified"


def test_llama_keeps_grouped_query_attention_valid():
    arch, model, example = "llama", build("llama"), example_input("llama")
    space = SearchSpace.from_model(model, example, ratio_min=0.25)
    pruned = apply_policy(model, space.uniform(space.ratio_min), example, groups=space.groups)
    for i in range(2):
        attn = pruned.get_submodule(ATTENTION[arch].format(i))
        assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (32, 16, 16)
        assert attn.num_key_value_groups == 2
    assert pruned.model.model.layers[0].mlp.up_proj.out_features == 16  # round(0.25 * 64)
    with torch.no_grad():
        assert pruned(example).shape == model(example).shape


def test_attention_products_are_counted_with_every_query_head(case):
    """count_cost adds per layer qlen*klen*(q width + heads) + qlen*klen*v width*kv_repeat to
    torch_pruning's count, which does not see scaled_dot_product_attention."""
    import torch_pruning as tp

    arch, model, example, _ = case
    counted = count_cost(model, example).flops
    tokens = 5 if arch == "vit" else 12  # ViT: 4 patches and the class token
    v_width = 16 if arch == "llama" else 32
    repeat = 2 if arch == "llama" else 1
    expected = 2 * (tokens * tokens * (32 + 4) + tokens * tokens * v_width * repeat)
    assert counted - tp.utils.count_ops_and_params(model, example)[0] == expected


def test_a_head_ratio_keeping_no_head_is_refused():
    model, example = build("vit"), example_input("vit")
    with pytest.raises(ValueError, match="keeps no head of group"):
        SearchSpace.from_model(model, example, ratio_min=0.1)
