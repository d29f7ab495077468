"""The built-in ``tokens`` task: procedural sequences whose labels follow their rules, a
hand-written-attention transformer whose heads are searchable groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluators.tokens import A, B, C, M1, M2, NUM_CLASSES, TokenTransformer, generate_tokens, tokens_options


def _label(seq: list[int]) -> int:
    order = seq.index(M1) < seq.index(M2)
    more_a = seq.count(A) > seq.count(B)
    half = len(seq) // 2
    first_half = sum(t == C for t in seq[:half]) > sum(t == C for t in seq[half:])
    return 4 * order + 2 * more_a + first_half


def test_every_label_follows_the_three_rules():
    x, y = generate_tokens(400, seed=3)
    assert x.dtype == torch.long and x.shape == (400, 24)
    for seq, label in zip(x.tolist(), y.tolist()):
        assert seq.count(M1) == seq.count(M2) == 1 and seq.count(C) == 3 and seq.count(A) != seq.count(B)
        assert _label(seq) == label
    assert set(y.tolist()) == set(range(NUM_CLASSES))


def test_generation_is_deterministic_in_the_seed():
    assert torch.equal(generate_tokens(50, seed=1)[0], generate_tokens(50, seed=1)[0])
    assert not torch.equal(generate_tokens(50, seed=1)[0], generate_tokens(50, seed=2)[0])


@pytest.mark.parametrize("options, message", [
    ({"length": 8}, "length must be an integer >= 16"),
    ({"heads": 0}, "heads must be an integer >= 1"),
    ({"split": [0.5, 0.5]}, "split"),
    ({"widths": [1, 2, 3]}, "unknown option"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message):
        tokens_options(options)


def test_heads_mlp_widths_and_the_stream_are_groups_and_costed_exactly():
    from evaluators.prune import apply_policy
    from spaces.cost import count_cost
    from spaces.space import SearchSpace

    torch.manual_seed(0)
    model = TokenTransformer(dim=32, heads=4, head_dim=8, hidden=48, depth=2).eval()
    x = generate_tokens(4, seed=0)[0]
    space = SearchSpace.from_model(model, x[:1], ratio_min=0.25)
    heads = [g for g in space.groups if g.unit == 8]
    assert len(heads) == 2 and all(g.channels == 4 for g in heads)
    assert len(space.groups) == 5   # 2 head groups, 2 MLP hidden layers, the residual stream
    rng = np.random.default_rng(0)
    for _ in range(4):
        policy = space.sample(rng)
        pruned = apply_policy(model, policy, x[:1], groups=space.groups)
        assert pruned(x).shape == (4, NUM_CLASSES)
        assert count_cost(pruned, x[:1]).flops == space.predict_cost(policy).flops
        for g in heads:
            attn = pruned.get_submodule(g.name.rsplit(".", 1)[0])
            assert attn.num_heads == space.kept(policy)[g.name]


def test_a_small_tokens_task_trains_caches_and_evaluates_a_pruned_policy(tmp_path):
    from evaluators.evaluate import evaluate
    from evaluators.settings import EvalSettings
    from evaluators.tasks import load_task
    from spaces.space import SearchSpace

    options = {"n_samples": 160, "epochs": 1, "dim": 16, "heads": 2, "head_dim": 4, "hidden": 16, "depth": 1}
    task = load_task("tokens", options, cache_dir=tmp_path)
    assert [p.suffix for p in tmp_path.iterdir()] == [".pt"]
    again = load_task("tokens", options, cache_dir=tmp_path)   # from the cache: the same weights
    assert all(torch.equal(task.base_state[k], again.base_state[k]) for k in task.base_state)
    space = SearchSpace.from_model(task.base_model(), task.example_inputs, ratio_min=0.5)
    settings = EvalSettings(recovery="finetune", finetune_steps=2, calibration_samples=32, bn_batches=2)
    metrics = evaluate(space.uniform(0.5), task, settings, groups=space.groups)
    assert metrics.ok and 0 < metrics.flops_ratio < 1
    assert metrics.flops == space.predict_cost(space.uniform(0.5)).flops
