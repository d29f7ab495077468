"""Measurements of a (pruned) model: top-1 accuracy, FLOPs/params, CPU latency."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from spaces.cost import Cost, count_cost
from spaces.groups import forward

Batch = tuple[torch.Tensor, torch.Tensor]


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, restoring the previous value."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    previous = torch.get_num_threads()
    if previous != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def top1_accuracy(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Fraction of samples whose arg-max logit is the label (model put in eval mode)."""
    if not batches:
        raise ValueError("accuracy needs at least one batch; none were given")
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            out = model(x)
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(y):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"model output {shape} is not (batch, classes) logits for a batch of {len(y)}")
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    return correct / total


def model_cost(model: nn.Module, example_inputs: Any) -> Cost:
    """FLOPs (MACs per sample) and params counted on the real model.

    ``spaces.cost.count_cost`` is the counter the analytic cost model reproduces exactly,
    so measured and predicted costs are directly comparable.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return count_cost(model, example_inputs)
    finally:
        model.train(was_training)


def latency_ms(
    model: nn.Module, inputs: Any, *, runs: int = 20, warmup: int = 3, threads: int = 1
) -> float:
    """Median wall time (ms) of ``runs`` forward passes on ``inputs`` after ``warmup`` passes.

    Threads are fixed for the measurement so numbers are comparable between workers.
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be an integer >= 1, got {runs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    model.eval()
    times = []
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            forward(model, inputs)
        for _ in range(runs):
            start = time.perf_counter()
            forward(model, inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def latency_inputs(example_inputs: torch.Tensor, batch: int) -> torch.Tensor:
    """A batch of ``batch`` copies of the one-sample ``example_inputs``."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"latency batch must be an integer >= 1, got {batch!r}")
    return example_inputs.expand(batch, *example_inputs.shape[1:]).contiguous()
