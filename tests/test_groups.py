import logging

import pytest
import torch
import torch.nn as nn

from spaces.groups import discover_groups
from tests.architectures import ARCHITECTURES, GroupedConvNet, MobileNetV2Style, ResNetStyle


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_has_groups_and_output_layer_is_never_a_group(arch):
    cls, make_input = ARCHITECTURES[arch]
    model = cls()
    groups = discover_groups(model, make_input())
    assert groups
    names = [g.name for g in groups]
    assert len(set(names)) == len(names)
    head = list(model.named_modules())[-1][0]  # every test architecture ends with its classifier
    assert head not in names
    modules = dict(model.named_modules())
    for g in groups:
        assert g.channels >= 2 and g.name in modules and g.name in g.members


def test_residual_adds_couple_layers_into_one_group():
    model = ResNetStyle(widths=(16, 32), blocks=2)
    groups = discover_groups(model, torch.randn(1, 3, 16, 16))
    stream = [g for g in groups if "layers.0.conv2" in g.members]
    assert len(stream) == 1
    # the residual stream of the first stage couples the stem, both blocks' second convs
    assert {"stem.0", "layers.0.conv2", "layers.1.conv2"} <= set(stream[0].members)


def test_depthwise_conv_is_coupled_with_its_expansion():
    model = MobileNetV2Style()
    groups = discover_groups(model, torch.randn(1, 3, 16, 16))
    owner = [g for g in groups if "blocks.1.block.1.0" in g.members]
    assert len(owner) == 1 and "blocks.1.block.0.0" in owner[0].members


def test_grouped_conv_groups_are_excluded_with_a_logged_reason(caplog):
    with caplog.at_level(logging.INFO, logger="spaces.groups"):
        groups = discover_groups(GroupedConvNet(), torch.randn(1, 3, 16, 16))
    names = {g.name for g in groups}
    assert "grouped.0" not in names and "conv1.0" not in names
    assert "conv3.0" in names
    assert "grouped conv 'grouped.0'" in caplog.text


def test_user_ignored_layers_are_never_pruned():
    model = ResNetStyle(widths=(16, 32), blocks=1)
    groups = discover_groups(model, torch.randn(1, 3, 16, 16), ignored=["layers.1.conv1"])
    assert "layers.1.conv1" not in {g.name for g in groups}


def test_unknown_ignored_name_is_named():
    with pytest.raises(ValueError, match="unknown module 'nope'"):
        discover_groups(ResNetStyle(), torch.randn(1, 3, 16, 16), ignored=["nope"])


def test_model_without_prunable_group_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    with pytest.raises(ValueError, match="no prunable channel group"):
        discover_groups(model, torch.randn(1, 12))
