"""Recovery after pruning: a registry of methods that repair a pruned model cheaply.

Built-ins: ``none``; ``adaptive_bn`` (EagleEye, Li et al. 2020: reset the BatchNorm
running statistics and re-estimate them on calibration batches in train mode, without
gradients); ``finetune`` (adaptive BN, then ``finetune_steps`` SGD steps on the train
split with the task's loss (``Task.loss``, default cross-entropy), optionally distilled
from the unpruned model at ``temperature`` (``Task.distill``, default Hinton's KD), then
adaptive BN again for the final weights).

Register another one with::

    @register_recovery("mine")
    def mine(pruned, *, base, task, settings, calibration):
        ...
        return pruned
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from evaluators.batch import Batch, call
from evaluators.devices import model_device, placed, resolve_device, to_device
from evaluators.losses import task_distill, task_loss
from spaces.registry import Registry

if TYPE_CHECKING:
    from evaluators.settings import EvalSettings
    from evaluators.tasks import Task

log = logging.getLogger(__name__)

Recovery = Callable[..., nn.Module]

# Modules of this package that register further recoveries (e.g. "cap") are plugins:
# imported on the first lookup, because they import this module themselves.
RECOVERIES: Registry[Recovery] = Registry("recovery", plugins=("evaluators.compensation", "evaluators.recover_chains"))

# Share of the fine-tune loss taken by the distillation term when ``settings.kd``.
KD_ALPHA = 0.7


def register_recovery(name: str) -> Callable[[Recovery], Recovery]:
    """Decorator adding ``fn(pruned, *, base, task, settings, calibration) -> nn.Module``."""
    return RECOVERIES.register(name)


def available_recoveries() -> tuple[str, ...]:
    """Names of every registered recovery method."""
    return RECOVERIES.names()


def recover(
    name: str,
    pruned: nn.Module,
    *,
    base: nn.Module,
    task: "Task",
    settings: "EvalSettings",
    calibration: Sequence[Batch],
) -> nn.Module:
    """Apply recovery ``name`` to ``pruned`` (may modify it in place) and return it in eval mode.

    The recovery runs on ``settings.device``: ``pruned``, a copy of ``base`` (when it lives
    elsewhere) and the calibration batches are moved there; the result comes back on
    ``pruned``'s device."""
    fn = RECOVERIES.get(name)
    device = resolve_device(settings.device)
    home = model_device(pruned)
    model = fn(pruned.to(device), base=placed(base, device), task=task, settings=settings,
               calibration=to_device(list(calibration), device))
    if not isinstance(model, nn.Module):
        raise ValueError(f"recovery {name!r} returned {type(model).__name__}, not an nn.Module")
    return model.to(home).eval()


# -- built-ins ------------------------------------------------------------------------------
@register_recovery("none")
def no_recovery(pruned, *, base, task, settings, calibration) -> nn.Module:
    """Leave the pruned model as it is."""
    return pruned


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def recalibrate_bn(model: nn.Module, batches: Sequence[Batch]) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (EagleEye).

    Only the BN layers are put in train mode (dropout etc. stay in eval), and momentum is
    set to None for the pass so the statistics are the exact average over the batches
    rather than a blend with the stale pre-pruning values.
    """
    bns = _batchnorms(model)
    if not bns:
        return model
    if not batches:
        raise ValueError("adaptive BN needs calibration batches; none were given")
    was_training = model.training
    model.eval()
    momenta = []
    for bn in bns:
        momenta.append(bn.momentum)
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        device = model_device(model)
        with torch.no_grad():
            for x, _ in batches:
                call(model, to_device(x, device))
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
    return model


@register_recovery("adaptive_bn")
def adaptive_bn(pruned, *, base, task, settings, calibration) -> nn.Module:
    """Reset BN statistics and recompute them on ``settings.bn_batches`` calibration batches."""
    return recalibrate_bn(pruned, calibration[: settings.bn_batches])


@register_recovery("finetune")
def finetune(pruned, *, base, task, settings, calibration) -> nn.Module:
    """Adaptive BN, ``finetune_steps`` SGD steps (cosine lr, KD from ``base`` when ``kd``), adaptive BN again."""
    model = recalibrate_bn(pruned, calibration[: settings.bn_batches])
    steps = settings.finetune_steps
    if steps == 0:
        return model
    teacher = base.eval() if settings.kd else None
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.finetune_lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(settings.seed)
    n = task.sample_count("train")
    device = model_device(model)  # recover() put it on settings.device
    loss_fn, distill = task_loss(task), task_distill(task)
    model.train()
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(n, (min(settings.batch_size, n),), generator=generator)
            x, y = task.samples("train", idx)
            x, y = to_device(x, device), y.to(device)
            out = call(model, x)
            loss = loss_fn(out, y)
            if teacher is not None:
                with torch.no_grad():
                    target = call(teacher, x)
                loss = (1 - KD_ALPHA) * loss + KD_ALPHA * distill(out, target, settings.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.zero_grad(set_to_none=True)
    # The running statistics drifted with the weights during training; re-estimate them
    # for the final weights so evaluation matches what the fine-tune reached.
    return recalibrate_bn(model, calibration[: settings.bn_batches]).eval()
