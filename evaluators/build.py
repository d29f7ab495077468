"""build_pruned: the pruned and recovered model an evaluation measures, built once, here.

Every phase runs under the evaluation's settings: torch threads fixed to
``settings.threads``, the global RNG seeded with ``settings.seed`` (in a forked RNG, so the
caller's random stream is untouched) and the same seeded calibration batches for pruning
and recovery. The Ray workers, ``evaluators.evaluate`` and the export all build through it,
so a model rebuilt for export measures what its trial recorded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from evaluators import timing
from evaluators.prune import apply_policy
from evaluators.recover import recover
from evaluators.settings import EvalSettings
from evaluators.tasks import Task
from spaces.groups import ChannelGroup
from spaces.policy import Policy


def calibration_batches(task: Task, settings: EvalSettings) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The calibration batches every phase of an evaluation shares (seeded)."""
    return task.batches(
        "calibration", settings.calibration_batch_size, limit=settings.calibration_samples, seed=settings.seed
    )


@contextlib.contextmanager
def seeded(settings: EvalSettings) -> Iterator[None]:
    """Torch threads fixed to ``settings.threads`` and the global RNG seeded with
    ``settings.seed`` for the block; the caller's random stream is restored afterwards."""
    with timing.torch_threads(settings.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        yield


def build_pruned(policy: Policy, task: Task, settings: EvalSettings, *, groups: Sequence[ChannelGroup] | None,
                 round_to: int = 1, base: nn.Module | None = None,
                 timings: dict[str, float] | None = None) -> nn.Module:
    """``task``'s base model pruned by ``policy`` and recovered (``policy.recovery`` or
    ``settings.recovery``), in eval mode. ``base`` (never modified) is built from the task
    when not given, before seeding, as a worker's base model is. Raises when the policy
    cannot be applied. ``timings`` (when given) receives the seconds of ``prune`` and
    ``recover``.
    """
    timings = timings if timings is not None else {}
    base = base if base is not None else task.base_model()
    with seeded(settings):
        calibration = calibration_batches(task, settings)
        t = time.perf_counter()
        pruned = apply_policy(base, policy, task.example_inputs, calibration, groups=groups, round_to=round_to)
        timings["prune"] = time.perf_counter() - t
        t = time.perf_counter()
        recovery = policy.recovery or settings.recovery
        pruned = recover(recovery, pruned, base=base, task=task, settings=settings, calibration=calibration)
        timings["recover"] = time.perf_counter() - t
    return pruned.eval()
