"""A recovery in one file: the classifier head answers class 0 for every input."""

from __future__ import annotations

import torch
import torch.nn as nn

from evaluators.recover import register_recovery


@register_recovery("ext_constant")
def constant_head(pruned: nn.Module, *, base, task, settings, calibration) -> nn.Module:
    head = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[0] = 1.0
    return pruned
