"""An importance criterion in one file: minus the group L1 norm, so the largest filters go first."""

from __future__ import annotations

from typing import Any

import torch

from evaluators.importance import Importance, make_importance, register_importance


@register_importance("ext_reverse_l1")
class ReverseL1(Importance):
    """The opposite ranking of ``l1``."""

    def __init__(self) -> None:
        self._l1 = make_importance("l1")

    def score(self, group: Any) -> torch.Tensor:
        return -self._l1.score(group)
