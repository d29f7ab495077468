"""Hugging Face ViT, BERT and Llama (grouped-query) attention (``spaces.units``): random
policies over heads and widths give models that run, keep the output shape, keep exactly the
asked head counts and widths, and cost what the space predicts (FLOPs and params, exactly).
ViT/BERT heads are found through torch_pruning; Llama's rotary heads are laid out by hand, a
unit being one key/value head with the query heads sharing it."""

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
ATTENTION = {"vit": "model.vit.layers.{}.attention", "bert": "model.bert.encoder.layer.{}.attention.self",
             "llama": "model.model.layers.{}.self_attn"}
# (query heads, key/value heads, head size) of every layer of the test models
HEADS = {"vit": (4, 4, 8), "bert": (4, 4, 8), "llama": (8, 4, 8)}


@pytest.fixture(scope="module", params=ARCHS)
def case(request):
    model, example = build(request.param), example_input(request.param)
    space = SearchSpace.from_model(model, example, ratio_min=0.25, ratio_step=0.05, methods=("l1", "l2", "fpgm"))
    return request.param, model, example, space


def head_groups(arch: str, space: SearchSpace) -> dict[str, str]:
    """attention module -> the group of its heads"""
    found = {}
    for g in space.groups:
        for i in range(2):
            if any(m.startswith(ATTENTION[arch].format(i) + ".") and m.endswith(("k_proj", ".key")) for m in g.members):
                found[ATTENTION[arch].format(i)] = g.name
    return found


def widths(model, arch: str, layer: int) -> tuple[int, int, int, int]:
    """(q, k, v widths, output projection's input width) of one layer"""
    attn = model.get_submodule(ATTENTION[arch].format(layer))
    if arch == "bert":
        out = model.get_submodule(ATTENTION[arch].format(layer)[:-len(".self")] + ".output.dense")
        return attn.query.out_features, attn.key.out_features, attn.value.out_features, out.in_features
    return attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features, attn.o_proj.in_features


def test_each_layer_has_a_head_group_beside_its_mlp_width_and_the_residual_stream(case, caplog):
    arch, model, example, space = case
    heads = head_groups(arch, space)
    q_heads, kv_heads, size = HEADS[arch]
    assert sorted(heads) == [ATTENTION[arch].format(i) for i in range(2)]
    for name in heads.values():
        g = next(g for g in space.groups if g.name == name)
        assert (g.channels, g.unit) == (kv_heads, size * q_heads // kv_heads)  # units: key/value heads
    assert len([g for g in space.groups if not g.counts and g.channels == 64]) == 2  # each layer's MLP width
    assert any(g.channels == 32 and len(g.members) > 4 for g in space.groups)  # the residual stream
    if arch == "llama":
        with caplog.at_level(logging.INFO, logger="spaces.groups"):
            SearchSpace.from_model(model, example)
        assert "'model.model.layers.0.self_attn.q_proj' laid out by hand: q/k of" in caplog.text


def test_random_policies_keep_the_asked_heads_and_cost_what_was_predicted(case):
    arch, model, example, space = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shape = model(example).shape
    q_heads, kv_heads, size = HEADS[arch]
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
        for module, group in head_groups(arch, space).items():
            kv = kept[group]  # kept key/value heads; each keeps its q_heads // kv_heads query heads
            q = kv * q_heads // kv_heads
            layer = int(next(part for part in module.split(".") if part.isdigit()))
            assert widths(pruned, arch, layer) == (q * size, kv * size, kv * size, q * size)
            attn = pruned.get_submodule(module)
            if arch == "llama":
                assert attn.num_key_value_groups == q_heads // kv_heads  # grouped-query attention stays valid
            else:
                assert attn.num_attention_heads == q
        assert space.predict_cost(policy) == count_cost(pruned, example)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model was modified"


def test_llama_loses_whole_key_value_heads_with_the_query_heads_sharing_them():
    model, example = build("llama"), example_input("llama")
    space = SearchSpace.from_model(model, example)
    group = head_groups("llama", space)["model.model.layers.0.self_attn"]
    pruned = apply_policy(model, Policy(ratios={group: 0.5}), example, groups=space.groups)
    old, new = model.model.model.layers[0].self_attn, pruned.model.model.layers[0].self_attn
    kv_rows = {int(torch.nonzero((old.k_proj.weight == r).all(dim=1))) for r in new.k_proj.weight}
    kept_kv = sorted({r // 8 for r in kv_rows})
    assert len(kept_kv) == 2 and kv_rows == {h * 8 + j for h in kept_kv for j in range(8)}
    q_heads = [2 * h + i for h in kept_kv for i in range(2)]  # query heads 2h, 2h+1 share key/value head h
    assert torch.equal(new.q_proj.weight, torch.cat([old.q_proj.weight[h * 8:(h + 1) * 8] for h in q_heads]))
    assert torch.equal(new.v_proj.weight, torch.cat([old.v_proj.weight[h * 8:(h + 1) * 8] for h in kept_kv]))
    assert torch.equal(new.o_proj.weight, torch.cat([old.o_proj.weight[:, h * 8:(h + 1) * 8] for h in q_heads], dim=1))


def test_attention_products_are_counted_with_every_query_head(case):
    """count_cost adds per layer qlen*klen*(q width + heads) + qlen*klen*v width*kv_repeat to
    torch_pruning's count, which does not see scaled_dot_product_attention."""
    import torch_pruning as tp

    arch, model, example, _ = case
    q_heads, kv_heads, size = HEADS[arch]
    tokens = 5 if arch == "vit" else 12  # ViT: 4 patches and the class token
    per_layer = tokens * tokens * (q_heads * size + q_heads) + tokens * tokens * kv_heads * size * (q_heads // kv_heads)
    assert count_cost(model, example).flops - tp.utils.count_ops_and_params(model, example)[0] == 2 * per_layer


def test_a_head_ratio_keeping_no_head_is_refused():
    model, example = build("vit"), example_input("vit")
    with pytest.raises(ValueError, match="keeps no head of group"):
        SearchSpace.from_model(model, example, ratio_min=0.1)


def test_a_ratio_keeping_no_key_value_head_of_llama_is_refused():
    model, example = build("llama"), example_input("llama")
    with pytest.raises(ValueError, match=r"^ratio_min 0.1 keeps no head of group 'model.model.layers.0.self_attn.q_proj' "
                                         r"\(4 units of whole heads\): ratio_min must be > 0.125$"):
        SearchSpace.from_model(model, example, ratio_min=0.1)


def test_ignoring_a_llama_projection_leaves_its_heads_out():
    model, example = build("llama"), example_input("llama")
    space = SearchSpace.from_model(model, example, ignored=["model.model.layers.1.self_attn.o_proj"])
    assert sorted(head_groups("llama", space)) == ["model.model.layers.0.self_attn"]
