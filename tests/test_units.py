"""spaces.units: which modules count blocks of a group's channels, and in what units."""

from __future__ import annotations

import pytest
import torch.nn as nn

from spaces.groups import ChannelGroup, check_keeps_a_head
from spaces.units import BlockCount, attention_modules, block_counts, unit_channels, unit_of
from tests.attention_models import Attention, MHAViT, QKVViT


def test_rules_count_groupnorm_groups_and_heads_but_not_a_single_group():
    model = nn.ModuleDict({"gn": nn.GroupNorm(4, 16), "ln": nn.GroupNorm(1, 16),
                           "mha": nn.MultiheadAttention(24, 3), "bn": nn.BatchNorm2d(16)})
    modules = dict(model.named_modules())
    touched = [(n, True) for n in ("gn", "ln", "mha", "bn")]
    assert block_counts(touched, modules) == (BlockCount("gn", "num_groups", 4), BlockCount("mha", "num_heads", 8))


def test_qkv_projections_count_heads_only_when_the_group_prunes_their_outputs():
    model = QKVViT()
    modules = dict(model.named_modules())
    assert block_counts([("blocks.1.attn.k_proj", True)], modules) == (BlockCount("blocks.1.attn", "num_heads", 8),)
    assert block_counts([("blocks.1.attn.k_proj", False)], modules) == ()  # the stream feeds their inputs
    assert block_counts([("blocks.1.attn.out_proj", True)], modules) == ()  # the output projection is not split


def test_hand_written_attention_is_found_by_its_head_count_and_projection_names():
    class Named(nn.Module):
        def __init__(self, heads):
            super().__init__()
            self.num_heads = heads
            self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    model = nn.ModuleDict({"a": Attention(16, 2, 8), "b": Named(2), "c": Named(True), "mha": nn.MultiheadAttention(8, 2)})
    assert attention_modules(model) == {
        "a": ("a.q_proj", "a.k_proj", "a.v_proj"), "b": ("b.query", "b.key", "b.value")}
    assert attention_modules(MHAViT()) == {}  # nn.MultiheadAttention is costed by its own formula


def test_units_are_the_least_common_multiple_of_the_block_sizes():
    assert unit_of([]) == 1
    assert unit_of([BlockCount("a", "num_groups", 4), BlockCount("b", "num_groups", 6)]) == 12
    assert unit_channels([2, 0], 3) == [0, 1, 2, 6, 7, 8]


def test_a_ratio_that_keeps_no_head_is_refused_in_one_line():
    heads = ChannelGroup("attn.q", 4, ("attn.q",), unit=8, counts=(BlockCount("attn", "num_heads", 8),))
    norm = ChannelGroup("conv", 4, ("conv",), unit=4, counts=(BlockCount("gn", "num_groups", 4),))
    check_keeps_a_head([heads, norm], 0.15, "ratio_min")  # round(0.6) = 1 head
    check_keeps_a_head([norm], 0.1)  # GroupNorm groups are clamped to one, as channels are
    with pytest.raises(ValueError, match=r"^ratio_min 0.1 keeps no head of group 'attn.q' .*ratio_min must be > 0.125$"):
        check_keeps_a_head([heads, norm], 0.1, "ratio_min")
