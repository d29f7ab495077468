"""Building blocks of the built-in tasks' models."""

from __future__ import annotations

import torch
import torch.nn as nn

from evaluators.blocks import InvertedResidual, ResidualBlock, conv_bn


def test_conv_bn_keeps_the_spatial_size_and_ends_in_relu_when_asked():
    x = torch.randn(2, 3, 9, 9)
    assert conv_bn(3, 5)(x).shape == (2, 5, 9, 9)
    assert conv_bn(3, 5, 3, stride=2)(x).shape == (2, 5, 5, 5)
    assert isinstance(conv_bn(3, 5)[-1], nn.ReLU) and isinstance(conv_bn(3, 5, act=False)[-1], nn.BatchNorm2d)
    assert conv_bn(4, 4, groups=4)[0].groups == 4


def test_residual_block_projects_the_shortcut_only_when_the_shape_changes():
    assert isinstance(ResidualBlock(4, 4).shortcut, nn.Identity)
    block = ResidualBlock(4, 8, stride=2).eval()
    assert not isinstance(block.shortcut, nn.Identity)
    assert block(torch.randn(1, 4, 8, 8)).shape == (1, 8, 4, 4)


def test_inverted_residual_adds_its_input():
    block = InvertedResidual(6, expand=2).eval()
    nn.init.zeros_(block.project[1].weight)  # the branch outputs zero: the block is the identity
    nn.init.zeros_(block.project[1].bias)
    x = torch.randn(1, 6, 5, 5)
    assert torch.equal(block(x), x)
    assert block.depthwise[0].groups == 12
