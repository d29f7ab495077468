"""A task's splits as torch map-style datasets, read in batches through a ``DataLoader``.

A split is either an in-memory pair ``(inputs, targets)`` (read by indexing, the fast path)
or any ``torch.utils.data.Dataset`` whose item ``i`` is ``(inputs_i, target_i)``: inputs a
tensor, a tuple or a dict of tensors without the sample axis (``evaluators.batch``), so a
dataset may decode its samples lazily, per item. ``as_dataset`` makes a pair one such
dataset (:class:`TensorPairs`). ``read_batches`` cuts either into batches: samples in a
seeded order (``torch.randperm`` of the split's length, the same for both kinds, so a
calibration or validation subset given by a sample count is the same samples in every
trial), ``limit`` samples at most, ``num_workers`` loader processes for a dataset. A
dataset's batches come as :class:`Batches`, a sequence that decodes a batch when it is
read (iterating streams them through the ``DataLoader``): a pass over the validation split
never holds more than a batch or two of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from evaluators.batch import Batch, Inputs, sample_count, take

Split = Any  # tuple[Inputs, Tensor] | torch.utils.data.Dataset


class TensorPairs(Dataset):
    """In-memory ``(inputs, targets)`` as a map-style dataset: item ``i`` is sample ``i``."""

    def __init__(self, inputs: Inputs, targets: Tensor):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Inputs, Tensor]:
        return take(self.inputs, index), self.targets[index]


def is_pair(split: Split) -> bool:
    return isinstance(split, tuple) and len(split) == 2 and isinstance(split[1], Tensor)


def as_dataset(split: Split) -> Dataset:
    """``split`` as a map-style dataset (a pair becomes :class:`TensorPairs`)."""
    return TensorPairs(*split) if is_pair(split) else split


def split_length(split: Split) -> int:
    """Samples in ``split``."""
    return sample_count(split[0]) if is_pair(split) else len(split)


def collate(items: Sequence[tuple[Inputs, Any]]) -> Batch:
    """Items ``(inputs, target)`` stacked into one batch of the same form."""
    first = items[0][0]
    if isinstance(first, Tensor):
        inputs: Inputs = torch.stack([x for x, _ in items])
    elif isinstance(first, Mapping):
        inputs = {k: torch.stack([x[k] for x, _ in items]) for k in first}
    else:
        inputs = tuple(torch.stack([x[i] for x, _ in items]) for i in range(len(first)))
    targets = [y for _, y in items]
    return inputs, torch.stack(targets) if isinstance(targets[0], Tensor) else torch.as_tensor(targets)


def samples_read(length: int, limit: int | None) -> int:
    """How many of a split's ``length`` samples a read of at most ``limit`` takes."""
    return length if limit is None else min(limit, length)


def sample_order(length: int, limit: int | None, seed: int | None) -> Tensor:
    """The indices read: a ``seed``-shuffled order (``None``: stored order), ``limit`` at most."""
    n = samples_read(length, limit)
    if seed is None:
        return torch.arange(n)
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:n]


class Batches(Sequence):
    """The batches of ``dataset`` at sample indices ``order``, read when asked for: an item
    (or a slice, as a list) is decoded then; iterating streams every batch in order through
    a ``DataLoader`` with ``num_workers`` processes."""

    def __init__(self, dataset: Dataset, order: Tensor, batch_size: int, num_workers: int = 0):
        self.dataset, self.order, self.batch_size, self.num_workers = dataset, order, batch_size, num_workers

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, index: int | slice) -> Batch | list[Batch]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        start = (index % len(self)) * self.batch_size
        return read_samples(self.dataset, self.order[start : start + self.batch_size])

    def __iter__(self) -> Iterator[Batch]:
        if not len(self.order):
            return iter(())
        return iter(DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.order.tolist(),
                               num_workers=self.num_workers, collate_fn=collate))


def read_batches(split: Split, batch_size: int, limit: int | None = None, seed: int | None = 0,
                 num_workers: int = 0) -> Sequence[Batch]:
    """``split`` cut into batches of ``batch_size`` samples (see the module docstring): a
    list for a pair, :class:`Batches` (decoded when read) for a dataset."""
    idx = sample_order(split_length(split), limit, seed)
    if is_pair(split):
        x, y = split
        return [(take(x, idx[i : i + batch_size]), y[idx[i : i + batch_size]]) for i in range(0, len(idx), batch_size)]
    return Batches(split, idx, batch_size, num_workers)


def read_samples(split: Split, index: Tensor) -> Batch:
    """The samples ``index`` of ``split`` as one batch (random draws, e.g. a fine-tune's)."""
    if is_pair(split):
        x, y = split
        return take(x, index), y[index]
    return collate([split[int(i)] for i in index])
