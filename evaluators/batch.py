"""``Batch``: one (inputs, targets) pair of tensors, as every task's data loader yields it."""

from __future__ import annotations

from torch import Tensor

Batch = tuple[Tensor, Tensor]
