"""build_pruned: the pruned and recovered model an evaluation measures, built once, here.

Every phase runs under the evaluation's settings: torch threads fixed to
``settings.threads``, the global RNG seeded with ``settings.seed`` (in a forked RNG, so the
caller's random stream is untouched) and the same seeded calibration batches for pruning
and recovery. The Ray workers, ``evaluators.evaluate`` and the export all build through it,
so a model rebuilt for export measures what its trial recorded.

Pruning and recovery run on ``settings.device`` (``evaluators.devices``); the pruned model
comes back on the device its base model was given on (a worker keeps its base model on
the device, so nothing moves there; the export passes a CPU model and gets a CPU model).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from evaluators import timing
from evaluators.devices import model_device, placed, resolve_device, to_device
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
def seeded(settings: EvalSettings, device: torch.device | None = None) -> Iterator[None]:
    """Torch threads fixed to ``settings.threads`` and the global RNG seeded with
    ``settings.seed`` for the block; the caller's random stream (the CPU's, and ``device``'s
    when it is a GPU) is restored afterwards."""
    gpus = [device] if device is not None and device.type == "cuda" else []
    with timing.torch_threads(settings.threads), torch.random.fork_rng(devices=gpus):
        torch.manual_seed(settings.seed)
        yield


def build_pruned(policy: Policy, task: Task, settings: EvalSettings, *, groups: Sequence[ChannelGroup] | None,
                 round_to: int = 1, base: nn.Module | None = None,
                 timings: dict[str, float] | None = None) -> nn.Module:
    """``task``'s base model pruned by ``policy`` and recovered (``policy.recovery`` or
    ``settings.recovery``), in eval mode, on ``base``'s device. ``base`` (never modified) is
    built from the task when not given, before seeding, as a worker's base model is. Raises
    when the policy cannot be applied or ``settings.device`` does not exist here.
    ``timings`` (when given) receives the seconds of ``prune`` and ``recover``.
    """
    timings = timings if timings is not None else {}
    device = resolve_device(settings.device)
    base = base if base is not None else task.base_model()
    home = model_device(base)
    base = placed(base, device)
    with seeded(settings, device):
        calibration = to_device(calibration_batches(task, settings), device)
        t = time.perf_counter()
        pruned = apply_policy(base, policy, to_device(task.example_inputs, device), calibration, groups=groups,
                              round_to=round_to, loss_fn=task.loss)
        timings["prune"] = time.perf_counter() - t
        t = time.perf_counter()
        recovery = policy.recovery or settings.recovery
        pruned = recover(recovery, pruned, base=base, task=task, settings=settings, calibration=calibration)
        timings["recover"] = time.perf_counter() - t
    return pruned.to(home).eval()
