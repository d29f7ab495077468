"""Timing of models: fixed intra-op threads, a steady allocator, plain and paired timing.

FLOPs do not predict speed well (memory-bound layers, kernel choices, odd channel counts),
so latency is measured. Paired timing (``measure_paired_ms``) times two models alternately
so both see the same state of the machine; their ratio is steadier than either latency.

A model is timed where it is: on the CPU with ``time.perf_counter`` around each forward
pass; on a GPU with a pair of ``torch.cuda.Event`` recorded around it after a
``torch.cuda.synchronize`` (kernels run asynchronously, so wall time around the call
would measure only their launch). ``inputs`` must be on the model's device.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from evaluators.devices import model_device, synchronize
from spaces.checks import check_int
from spaces.groups import forward

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Stop glibc from handing activation buffers back to the kernel after every forward pass.

    By default glibc serves allocations over 128 KiB-32 MiB with ``mmap`` and trims the heap
    on ``free``, so each forward pass of a CNN maps, page-faults and unmaps its activations
    again: kernel time inside every forward pass, and repeated timings of the *same* model
    that wander with the state of the page cache. Raising the mmap and trim
    thresholds keeps freed pages in the process (what jemalloc/tcmalloc do by default).
    Idempotent; returns whether the allocator was tuned (False off glibc).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1  # glibc's maximum
    ok = mallopt(_M_TRIM_THRESHOLD, 1024 * 1024 * 1024) == 1 and ok
    return ok


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run a block with ``threads`` intra-op threads, then restore the previous setting."""
    check_int("threads", threads, 1)
    previous = torch.get_num_threads()
    if previous != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def forward_ms(model: nn.Module, inputs: Any, device: torch.device) -> float:
    """Milliseconds of one forward pass of ``model`` on ``device`` (CUDA: event timing)."""
    if device.type == "cuda":
        synchronize(device)  # nothing queued before the pass is counted in it
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward(model, inputs)
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    start_s = time.perf_counter()
    forward(model, inputs)
    return (time.perf_counter() - start_s) * 1000.0


def measure_latency_ms(model: nn.Module, inputs: Any, *, runs: int = 20, warmup: int = 3, threads: int = 1,
                       statistic: str = "median") -> float:
    """Median (or ``statistic="min"``) wall time (ms) of ``runs`` forward passes after ``warmup`` untimed ones."""
    check_int("latency runs", runs, 1)
    check_int("latency warmup", warmup, 0)
    keep_freed_memory()
    was_training = model.training
    model.eval()
    device = model_device(model)
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            forward(model, inputs)
        times = [forward_ms(model, inputs, device) for _ in range(runs)]
    model.train(was_training)
    return min(times) if statistic == "min" else statistics.median(times)


def measure_paired_ms(model: nn.Module, reference: nn.Module, inputs: Any, *, rounds: int = 15, warmup: int = 3,
                      threads: int = 1) -> tuple[float, float]:
    """Latency (ms) of ``model`` and of ``reference``, timed alternately; use their ratio.

    Each round times both models back to back (A B, then B A), so both see the same state
    of the machine (frequency, other processes, a noisy neighbour on a shared VM). The
    ratio is the median over rounds of the two timings' ratio; ``reference`` is its fastest
    round and ``model`` that times the ratio. The machine's speed can shift between regimes
    for tens of milliseconds at a time, so the fastest rounds of two models often come from
    different regimes; the median of per-round ratios does not depend on that.
    """
    check_int("latency rounds", rounds, 1)
    keep_freed_memory()
    models = (model.eval(), reference.eval())
    device = model_device(model)
    if model_device(reference) != device:
        raise ValueError(f"paired timing needs both models on one device, got {device} and {model_device(reference)}")
    ratios, reference_ms = [], math.inf
    with torch_threads(threads), torch.inference_mode():
        for m in models:
            for _ in range(warmup):
                forward(m, inputs)
        for r in range(rounds):
            pair = [0.0, 0.0]
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                pair[i] = forward_ms(models[i], inputs, device)
            ratios.append(pair[0] / pair[1])
            reference_ms = min(reference_ms, pair[1])
    return statistics.median(ratios) * reference_ms, reference_ms


def latency_inputs(example_inputs: torch.Tensor, batch: int) -> torch.Tensor:
    """A batch of ``batch`` copies of the one-sample ``example_inputs`` (on its device)."""
    check_int("latency batch", batch, 1)
    return example_inputs.expand(batch, *example_inputs.shape[1:]).contiguous()
