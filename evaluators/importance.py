"""Registry of channel-importance criteria.

A criterion scores every channel of a torch_pruning group (one finite value per root
channel; higher = more important). Criteria that need data (Taylor, Shapley) receive
calibration batches in ``prepare``; asking for them without calibration data is an error.

Register a new one with::

    @register_importance("mine", needs_calibration=True)
    class Mine(Importance):
        def score(self, group): ...
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

Batch = tuple[torch.Tensor, torch.Tensor]


class Importance(abc.ABC):
    """Scores the channels of one group. Stateless across models except via ``prepare``."""

    needs_calibration: ClassVar[bool] = False

    def prepare(self, model: nn.Module, calibration: Sequence[Batch] | None, loss_fn: Callable | None = None) -> None:
        """Called once per pruned model before any ``score`` (gradients, activations...)."""

    @abc.abstractmethod
    def score(self, group: Any) -> torch.Tensor:
        """One score per root channel of ``group`` (a full-index torch_pruning group)."""


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[..., Importance]
    needs_calibration: bool


_REGISTRY: dict[str, _Entry] = {}


def register_importance(name: str, *, needs_calibration: bool = False):
    """Class decorator adding an importance criterion under ``name``."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"importance {name!r} is already registered")
        cls.needs_calibration = needs_calibration
        _REGISTRY[name] = _Entry(name, cls, needs_calibration)
        return cls

    return wrap


def available_importances() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def needs_calibration(name: str) -> bool:
    return _entry(name).needs_calibration


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(available_importances())})") from None


def make_importance(name: str, **options: Any) -> Importance:
    """A fresh criterion instance; ``ValueError`` for an unknown name."""
    return _entry(name).factory(**options)


# -- criteria backed by torch_pruning's implementations ------------------------------------
class _TorchPruningImportance(Importance):
    def __init__(self, impl: Any):
        self._impl = impl

    def score(self, group: Any) -> torch.Tensor:
        with torch.no_grad():
            scores = self._impl(group)
        return scores.detach().float().cpu()


@register_importance("l1")
class L1Importance(_TorchPruningImportance):
    """Group L1 norm of the weights (Li et al. 2017)."""

    def __init__(self):
        super().__init__(tp.importance.GroupMagnitudeImportance(p=1))


@register_importance("l2")
class L2Importance(_TorchPruningImportance):
    """Group L2 norm of the weights."""

    def __init__(self):
        super().__init__(tp.importance.GroupMagnitudeImportance(p=2))


@register_importance("bn_scale")
class BNScaleImportance(_TorchPruningImportance):
    """|gamma| of the group's BatchNorm layers (Network Slimming); L1 where a group has none."""

    def __init__(self):
        super().__init__(tp.importance.BNScaleImportance())
        self._fallback = tp.importance.GroupMagnitudeImportance(p=1)

    def score(self, group: Any) -> torch.Tensor:
        has_bn = any(isinstance(dep.target.module, nn.modules.batchnorm._BatchNorm) for dep, _ in group)
        if not has_bn:
            with torch.no_grad():
                return self._fallback(group).detach().float().cpu()
        return super().score(group)


@register_importance("fpgm")
class FPGMImportance(_TorchPruningImportance):
    """Distance to the geometric median of the group's filters (He et al. 2019)."""

    def __init__(self):
        super().__init__(tp.importance.FPGMImportance(p=2))


@register_importance("lamp")
class LAMPImportance(_TorchPruningImportance):
    """Layer-adaptive magnitude-based pruning scores (Lee et al. 2021)."""

    def __init__(self):
        super().__init__(tp.importance.LAMPImportance(p=2))


def default_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)


def accumulate_gradients(model: nn.Module, calibration: Sequence[Batch], loss_fn: Callable | None) -> None:
    """Sum the loss gradients of ``calibration`` batches into ``.grad`` (BN stats frozen)."""
    loss_fn = loss_fn or default_loss
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for x, y in calibration:
            loss_fn(model(x), y).backward()
    model.train(was_training)


@register_importance("taylor", needs_calibration=True)
class TaylorImportance(_TorchPruningImportance):
    """First-order Taylor expansion of the loss, |w * dL/dw| summed per group (Molchanov 2019)."""

    def __init__(self):
        super().__init__(tp.importance.GroupTaylorImportance())

    def prepare(self, model, calibration, loss_fn=None) -> None:
        accumulate_gradients(model, calibration, loss_fn)
