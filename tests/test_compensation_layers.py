"""Which layers compensation can refit, and which base rows/columns a pruned layer kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from evaluators.compensation_layers import conv_padding, in_width, kept_indices, unsupported


def test_kept_indices_recovers_the_slices():
    torch.manual_seed(0)
    w = torch.randn(10, 7, 3, 3)
    rows, cols = [0, 2, 3, 7, 9], [1, 4, 5]
    assert kept_indices(w[rows][:, cols], w) == (rows, cols)
    assert kept_indices(w[:, cols], w) == (list(range(10)), cols)
    assert kept_indices(w[rows][:, cols] + 1e-3, w) is None


def test_kept_indices_of_linear_weights_and_mismatched_shapes():
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    assert kept_indices(w[[1, 4]][:, [0, 3, 7]], w) == ([1, 4], [0, 3, 7])
    assert kept_indices(torch.randn(2, 3, 3, 3), torch.randn(4, 3, 5, 5)) is None  # other kernel size


def test_in_width():
    assert in_width(nn.Linear(5, 3)) == 5
    assert in_width(nn.Conv2d(4, 8, 3)) == 4
    assert in_width(nn.ReLU()) is None


@pytest.mark.parametrize("conv, padding", [
    (nn.Conv2d(2, 2, 3, padding=1), (1, 1)),
    (nn.Conv2d(2, 2, 3, padding="valid"), (0, 0)),
    (nn.Conv2d(2, 2, 5, padding="same"), (2, 2)),
    (nn.Conv2d(2, 2, 4, padding="same"), None),  # asymmetric
])
def test_conv_padding(conv, padding):
    assert conv_padding(conv) == padding


@pytest.mark.parametrize("module, reason", [
    (nn.Linear(4, 4), None),
    (nn.Conv2d(4, 4, 3, padding=1), None),
    (nn.Conv2d(4, 4, 3, groups=4), "grouped/depthwise conv"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode 'reflect'"),
    (nn.Conv2d(4, 4, 4, padding="same"), "asymmetric 'same' padding"),
    (nn.Conv1d(4, 4, 3), "Conv1d is not a Conv2d or Linear"),
])
def test_unsupported_layers_name_their_reason(module, reason):
    found = unsupported(module)
    assert found is None if reason is None else reason in found
