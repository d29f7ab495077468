"""Channel groups feeding ``GroupNorm`` are pruned in whole normalisation groups
(``spaces.units``): kept widths are multiples of the group size, ``num_groups`` follows,
kept channels are whole original groups, and predicted cost equals counted cost."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

from evaluators.prune import apply_policy
from spaces.cost import count_cost
from spaces.groups import discover_groups
from spaces.policy import Policy
from spaces.space import SearchSpace
from tests.attention_models import GroupNormNet, image_input


@pytest.fixture(scope="module")
def space():
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    return model, SearchSpace.from_model(model, image_input(), ratio_min=0.25, methods=("l1", "l2", "fpgm"))


def test_groupnorm_groups_are_found_in_units_of_whole_normalisation_groups(space):
    _, sp = space
    by_name = {g.name: g for g in sp.groups}
    assert set(by_name) == {"conv1", "conv3"}
    assert (by_name["conv1"].channels, by_name["conv1"].unit) == (4, 4)  # GroupNorm(4, 16)
    # GroupNorm(8, 32) (groups of 4) and GroupNorm(4, 32) (groups of 8) on one stream: units of 8
    assert (by_name["conv3"].channels, by_name["conv3"].unit) == (4, 8)
    assert {(c.module, c.size) for c in by_name["conv3"].counts} == {("gn2", 4), ("gn3", 8)}


def test_random_policies_update_num_groups_and_cost_what_was_predicted(space):
    model, sp = space
    x = image_input()
    rng = np.random.default_rng(0)
    for i in range(10):
        policy = Policy(ratios=sp.sample(rng).ratios, method=sp.methods[i % len(sp.methods)])
        pruned = apply_policy(model, policy, x, groups=sp.groups)
        assert pruned(x).shape == (1, 10)
        kept = sp.kept(policy)
        assert pruned.conv1.out_channels == pruned.gn1.num_channels == 4 * kept["conv1"]
        assert pruned.gn1.num_groups == kept["conv1"]
        assert pruned.gn2.num_groups == 2 * kept["conv3"] and pruned.gn3.num_groups == kept["conv3"]
        assert sp.predict_cost(policy) == count_cost(pruned, x)


def test_kept_channels_are_whole_original_normalisation_groups(space):
    model, sp = space
    pruned = apply_policy(model, Policy(ratios={"conv1": 0.5}), image_input(), groups=sp.groups)
    kept = [int(torch.nonzero((model.conv1.weight == w).flatten(1).all(dim=1))) for w in pruned.conv1.weight]
    blocks = sorted({k // 4 for k in kept})
    assert len(blocks) == 2 and kept == [b * 4 + j for b in blocks for j in range(4)]


def test_single_group_norm_prunes_channel_by_channel():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(1, 6), nn.ReLU(), nn.Conv2d(6, 4, 1))
    groups = discover_groups(model, image_input())
    assert [(g.name, g.channels, g.unit) for g in groups] == [("0", 6, 1)]


def test_a_stream_whose_normalisation_groups_leave_one_unit_is_excluded_with_a_reason(caplog):
    class Mixed(nn.Module):  # one 12-channel stream under groups of 4 and of 3: units of lcm = 12
        def __init__(self):
            super().__init__()
            self.a, self.na = nn.Conv2d(3, 12, 1), nn.GroupNorm(3, 12)
            self.b, self.nb = nn.Conv2d(12, 12, 1), nn.GroupNorm(4, 12)
            self.out = nn.Conv2d(12, 2, 1)

        def forward(self, x):
            y = self.na(self.a(x))
            return self.out(y + self.nb(self.b(y)))

    with caplog.at_level(logging.INFO, logger="spaces.groups"):
        with pytest.raises(ValueError, match="no prunable channel group"):
            discover_groups(Mixed(), image_input())
    assert "has a single block of 12 channels" in caplog.text
