"""``Batch``: one (inputs, targets) pair, as every task's data yields it, and the helpers
that treat a batch's inputs the same whatever their form.

``inputs`` is a tensor, a tuple of tensors (the model is called ``model(*inputs)``) or a
dict of tensors (``model(**inputs)``, e.g. ``input_ids`` + ``attention_mask`` as Hugging
Face models take them); every tensor's first axis is the sample axis. ``targets`` is a
tensor with the same first axis (labels, regression targets, masks, next tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from spaces.groups import forward

Inputs = Any  # Tensor | tuple[Tensor, ...] | dict[str, Tensor]
Batch = tuple[Inputs, Tensor]

__all__ = ["Batch", "Inputs", "call", "check_inputs", "concat", "sample_count", "take"]


def call(model: Any, inputs: Inputs) -> Any:
    """``model`` applied to ``inputs``: ``model(x)``, ``model(*x)`` for a tuple, ``model(**x)``
    for a dict (the same call Torch-Pruning and the cost counter make with example inputs)."""
    return forward(model, inputs)


def check_inputs(name: str, inputs: Inputs) -> int:
    """The number of samples in ``inputs``; ``ValueError`` (one line) when it is not a tensor,
    a non-empty tuple or dict of tensors, or its tensors disagree on the sample count."""
    if isinstance(inputs, Tensor):
        tensors = [inputs]
    elif isinstance(inputs, (tuple, Mapping)) and len(inputs) > 0:
        tensors = list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs)
        if isinstance(inputs, Mapping) and not all(isinstance(k, str) for k in inputs):
            raise ValueError(f"{name}: a dict of inputs must have string keys (the model's argument names)")
    else:
        raise ValueError(f"{name} must be a tensor, a tuple or a dict of tensors, got {type(inputs).__name__}")
    if not all(isinstance(t, Tensor) and t.dim() >= 1 for t in tensors):
        raise ValueError(f"{name}: every input must be a tensor with a sample axis")
    counts = {len(t) for t in tensors}
    if len(counts) != 1:
        raise ValueError(f"{name}: its tensors hold different sample counts {sorted(counts)}")
    return counts.pop()


def sample_count(inputs: Inputs) -> int:
    """Samples in ``inputs`` (the first axis of its first tensor)."""
    if isinstance(inputs, Tensor):
        return len(inputs)
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs[0]
    return len(first)


def take(inputs: Inputs, index: Tensor | slice) -> Inputs:
    """The samples ``index`` of ``inputs`` (every tensor indexed alike), in the same form."""
    if isinstance(inputs, Tensor):
        return inputs[index]
    if isinstance(inputs, Mapping):
        return {k: v[index] for k, v in inputs.items()}
    return tuple(v[index] for v in inputs)


def concat(parts: list[Inputs]) -> Inputs:
    """Inputs of the same form joined along the sample axis."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(first)))
