"""A task's splits as map-style datasets: the same batches, subsets and evaluations as the
in-memory pairs they replace, read lazily through a DataLoader."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from evaluators.datasets import TensorPairs, collate, read_batches
from evaluators.evaluate import evaluate
from evaluators.settings import EvalSettings
from evaluators.tasks import SPLITS, Task
from spaces.space import SearchSpace
from tests.fakes import tiny_task


class Counted(Dataset):
    """Items made on demand (as a decoding dataset would), counting every read."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i].clone(), self.y[i]


def _lazy(task: Task) -> Task:
    lazy = replace(task, **{s: Counted(*task.split(s)) for s in SPLITS})
    for split in SPLITS:  # the Task read each split's first item to check its form
        assert lazy.split(split).reads == 1
        lazy.split(split).reads = 0
    return lazy


def _equal(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("limit, seed", [(None, 0), (50, 3), (7, None), (1000, 1)])
def test_a_dataset_split_gives_the_pair_split_batches(limit, seed):
    task = tiny_task(samples=64)
    lazy = _lazy(task)
    for split in SPLITS:
        _equal(task.batches(split, 16, limit=limit, seed=seed), lazy.batches(split, 16, limit=limit, seed=seed))
    # a sample-count subset reads only those samples: nothing is decoded ahead
    assert lazy.validation.reads == min(limit or 64, 64)
    assert lazy.sample_counts() == task.sample_counts() == {s: 64 for s in SPLITS}
    # the count of a limited read, known without reading
    read = sum(len(y) for _, y in task.batches("validation", 16, limit=limit, seed=seed))
    lazy.validation.reads = 0
    assert lazy.sample_count("validation", limit) == read and lazy.validation.reads == 0


def test_loader_processes_give_the_same_batches():
    task = tiny_task(samples=40)
    lazy = replace(_lazy(task), num_workers=2)
    _equal(task.batches("train", 8, seed=5), lazy.batches("train", 8, seed=5))


def test_tuple_and_dict_inputs_collate_in_their_form():
    x, y = torch.randn(6, 3), torch.arange(6)
    pairs = {"t": (x, y), "tuple": ((x, x * 2), y), "dict": ({"a": x, "b": x[:, :1]}, y)}
    for name, (inputs, targets) in pairs.items():
        got = read_batches(TensorPairs(inputs, targets), 4, seed=2)
        want = read_batches((inputs, targets), 4, seed=2)
        assert [type(b[0]) for b in got] == [type(b[0]) for b in want], name
        for (ga, gy), (wa, wy) in zip(got, want):
            assert torch.equal(gy, wy)
            flat = (lambda v: list(v.values()) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else [v])
            assert all(torch.equal(p, q) for p, q in zip(flat(ga), flat(wa)))
    assert torch.equal(collate([(x[0], 1), (x[1], 2)])[1], torch.tensor([1, 2]))


def test_evaluation_with_fine_tune_is_the_same_on_a_dataset_task():
    """Calibration, fine-tune draws (Task.samples) and validation all read the datasets."""
    task = tiny_task(samples=48)
    space = SearchSpace.from_model(task.base_model(), task.example_inputs, ratio_min=0.4)
    policy = space.sample(np.random.default_rng(0))
    settings = EvalSettings(calibration_samples=32, bn_batches=2, eval_samples=40, recovery="finetune",
                            finetune_steps=3, batch_size=16)
    a = evaluate(policy, task, settings, groups=space.groups)
    lazy = _lazy(task)
    b = evaluate(policy, lazy, settings, groups=space.groups)
    assert a.ok and b.ok, (a.error, b.error)
    assert (a.accuracy, a.flops, a.params) == (b.accuracy, b.flops, b.params)
    assert lazy.train.reads == 3 * 16  # three fine-tune steps of 16 drawn samples


@pytest.mark.parametrize("change, match", [
    ({"train": TensorPairs(torch.randn(0, 3, 16, 16), torch.zeros(0, dtype=torch.long))}, "train split is empty"),
    ({"validation": [1, 2, 3]}, "validation must be a tuple"),
    ({"num_workers": -1}, "num_workers must be an integer >= 0"),
])
def test_bad_dataset_splits_are_one_line_errors(change, match):
    with pytest.raises(ValueError, match=match):
        replace(tiny_task(samples=8), **change)


def test_dataset_items_must_be_pairs():
    class Bare(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(3, 16, 16)

    with pytest.raises(ValueError, match="calibration dataset items must be \\(inputs, target\\) pairs, got Tensor"):
        replace(tiny_task(samples=8), calibration=Bare())


def test_stream_decodes_a_batch_when_it_is_read():
    """Task.stream (how an evaluation scores): a sequence of batches, none decoded ahead."""
    task = tiny_task(samples=40)
    lazy = _lazy(task)
    want = task.batches("validation", 16, limit=36, seed=None)
    stream = lazy.stream("validation", 16, limit=36, seed=None)
    assert len(stream) == 3 and lazy.validation.reads == 0
    xb, yb = stream[-1]
    assert torch.equal(xb, want[2][0]) and torch.equal(yb, want[2][1]) and lazy.validation.reads == 4
    _equal(stream[:2], want[:2])
    lazy.validation.reads = 0
    seen = []
    for x, y in stream:  # streamed: the first batch arrives before the later ones are read
        seen.append(lazy.validation.reads)
    assert seen == [16, 32, 36]
    _equal(list(stream), want)
    with pytest.raises(IndexError):
        stream[3]
    _equal(replace(lazy, num_workers=2).stream("validation", 16, seed=1), task.batches("validation", 16, seed=1))


def test_masking_reads_a_dataset_train_split_a_batch_per_step(digits_setup):
    """search.masking's run on a dataset task: the policy of the in-memory task, and only
    the batches its steps use are decoded (not the whole train split up front)."""
    from search.masking import _run
    from search.masking_core import MaskingConfig

    task, _, space = digits_setup
    lazy = _lazy(task)
    config = MaskingConfig(target=0.5, steps=4, rerank_every=2, seed=0)
    want = _run(task, space(0.1), config, 32, 1)
    got = _run(lazy, space(0.1), config, 32, 1)
    assert got[0] == want[0]
    assert 0 < lazy.train.reads <= 4 * 32 < task.sample_count("train")
