"""Registry of channel-importance criteria.

A criterion scores every channel of a torch_pruning group (one finite value per root
channel; higher = more important). Criteria that need data (``taylor``, ``taylor_bn``,
``shapley``) receive calibration batches in ``prepare``; asking for them without
calibration data is an error. Built-ins: l1, l2, bn_scale, fpgm, lamp (weights only),
taylor / taylor_bn (Molchanov et al. 2019, below) and shapley (``evaluators.shapley``).

Register a new one with::

    @register_importance("mine", needs_calibration=True)
    class Mine(Importance):
        def score(self, group): ...
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from evaluators.batch import Batch, call
from spaces.registry import Registry

log = logging.getLogger(__name__)


class Importance(abc.ABC):
    """Scores the channels of one group. Stateless across models except via ``prepare``."""

    needs_calibration: ClassVar[bool] = False

    def prepare(self, model: nn.Module, calibration: Sequence[Batch] | None, loss_fn: Callable | None = None) -> None:
        """Called once per pruned model before any ``score`` (gradients, activations...)."""

    @abc.abstractmethod
    def score(self, group: Any) -> torch.Tensor:
        """One score per root channel of ``group`` (a full-index torch_pruning group)."""


IMPORTANCES: Registry[type[Importance]] = Registry(
    "importance", plugins=("evaluators.shapley",), unknown="unknown method {name!r}"
)


def register_importance(name: str, *, needs_calibration: bool = False) -> Callable[[type[Importance]], type[Importance]]:
    """Class decorator adding an importance criterion under ``name``."""

    def wrap(cls: type[Importance]) -> type[Importance]:
        IMPORTANCES.add(name, cls)
        cls.needs_calibration = needs_calibration
        return cls

    return wrap


def available_importances() -> tuple[str, ...]:
    return IMPORTANCES.names()


def needs_calibration(name: str) -> bool:
    return IMPORTANCES.get(name).needs_calibration


def make_importance(name: str, **options: Any) -> Importance:
    """A fresh criterion instance; ``ValueError`` for an unknown name."""
    return IMPORTANCES.get(name)(**options)


def has_batchnorm(group: Any) -> bool:
    """Whether a torch_pruning group prunes a BatchNorm layer."""
    return any(isinstance(dep.target.module, nn.modules.batchnorm._BatchNorm) for dep, _ in group)


# -- criteria backed by torch_pruning's implementations ------------------------------------
class _TorchPruningImportance(Importance):
    """A torch_pruning criterion: subclasses set ``impl``, a factory of the implementation."""

    impl: ClassVar[Callable[[], Any]]

    def __init__(self) -> None:
        self._impl = self.impl()

    def score(self, group: Any) -> torch.Tensor:
        with torch.no_grad():
            scores = self._impl(group)
        return scores.detach().float().cpu()


def _weight_criterion(name: str, class_name: str, impl: Callable[[], Any], doc: str) -> type[Importance]:
    """A registered :class:`_TorchPruningImportance` subclass; bind it to ``class_name`` in this
    module so instances pickle by reference."""
    cls = type(class_name, (_TorchPruningImportance,), {"impl": impl, "__doc__": doc, "__module__": __name__})
    return register_importance(name)(cls)


L1Importance = _weight_criterion("l1", "L1Importance", partial(tp.importance.GroupMagnitudeImportance, p=1),
                                 "Group L1 norm of the weights (Li et al. 2017).")
L2Importance = _weight_criterion("l2", "L2Importance", partial(tp.importance.GroupMagnitudeImportance, p=2),
                                 "Group L2 norm of the weights.")
FPGMImportance = _weight_criterion("fpgm", "FPGMImportance", partial(tp.importance.FPGMImportance, p=2),
                                   "Distance to the geometric median of the group's filters (He et al. 2019).")
LAMPImportance = _weight_criterion("lamp", "LAMPImportance", partial(tp.importance.LAMPImportance, p=2),
                                   "Layer-adaptive magnitude-based pruning scores (Lee et al. 2021).")


@register_importance("bn_scale")
class BNScaleImportance(_TorchPruningImportance):
    """|gamma| of the group's BatchNorm layers (Network Slimming); L1 where a group has none."""

    impl = tp.importance.BNScaleImportance

    def __init__(self) -> None:
        super().__init__()
        self._fallback = L1Importance()

    def score(self, group: Any) -> torch.Tensor:
        return super().score(group) if has_batchnorm(group) else self._fallback.score(group)


# -- data-driven criteria ------------------------------------------------------------------
def default_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)


_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
_GATED = (nn.modules.batchnorm._BatchNorm,)  # the FO-BN gate


@dataclass
class _TaylorStats:
    """Per calibration batch (rows), first-order terms sum(param * dL/dparam) of one layer."""

    out: torch.Tensor | None = None   # per output channel: filter weights (+ bias)
    inp: torch.Tensor | None = None   # per input channel: the weight slice reading it
    gate: torch.Tensor | None = None  # per BN channel: gamma*dL/dgamma + beta*dL/dbeta


def _first_order_terms(module: nn.Module) -> dict[str, torch.Tensor]:
    terms: dict[str, torch.Tensor] = {}
    if isinstance(module, _WEIGHTED) and module.weight is not None and module.weight.grad is not None:
        wg = (module.weight.detach() * module.weight.grad).double()
        transposed = getattr(module, "transposed", False)
        out_dim, in_dim = (1, 0) if transposed else (0, 1)
        terms["out"] = wg.transpose(0, out_dim).flatten(1).sum(1) if out_dim else wg.flatten(1).sum(1)
        if getattr(module, "groups", 1) == 1:
            # grouped/depthwise convs: input j is read by output j only, the out term covers it
            terms["inp"] = wg.transpose(0, in_dim).flatten(1).sum(1) if in_dim else wg.flatten(1).sum(1)
        if module.bias is not None and module.bias.grad is not None:
            terms["out"] = terms["out"] + (module.bias.detach() * module.bias.grad).double()
    elif isinstance(module, _GATED) and getattr(module, "weight", None) is not None and module.weight.grad is not None:
        gate = (module.weight.detach() * module.weight.grad).double()
        if module.bias is not None and module.bias.grad is not None:
            gate = gate + (module.bias.detach() * module.bias.grad).double()
        terms["gate"] = gate.flatten()
    return terms


def taylor_statistics(
    model: nn.Module, calibration: Sequence[Batch], loss_fn: Callable | None = None
) -> dict[nn.Module, _TaylorStats]:
    """First-order terms of every conv/linear/BN layer, one row per calibration batch.

    Gradients are taken in eval mode (BN statistics frozen, dropout off) so the result is
    deterministic; ``.grad`` is cleared afterwards.
    """
    loss_fn = loss_fn or default_loss
    rows: dict[nn.Module, dict[str, list[torch.Tensor]]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for x, y in calibration:
                model.zero_grad(set_to_none=True)
                loss_fn(call(model, x), y).backward()
                for module in model.modules():
                    for kind, term in _first_order_terms(module).items():
                        rows.setdefault(module, {}).setdefault(kind, []).append(term)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {m: _TaylorStats(**{k: torch.stack(v) for k, v in kinds.items()}) for m, kinds in rows.items()}


class _TaylorBase(Importance):
    """Molchanov et al. 2019: importance = mean over batches of (sum of param * grad)^2.

    The sum runs over every parameter removed with the channel (the "group" contribution),
    computed per calibration batch and squared before averaging, as in the paper.
    """

    kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._stats: dict[nn.Module, _TaylorStats] | None = None

    def prepare(self, model, calibration, loss_fn=None) -> None:
        if not calibration:
            raise ValueError(f"{type(self).__name__} needs calibration batches; none were given")
        self._stats = taylor_statistics(model, calibration, loss_fn)
        self._modules = set(model.modules())

    def _group_terms(self, group: Any, kinds: tuple[str, ...]) -> torch.Tensor | None:
        if self._stats is None:
            raise ValueError(f"{type(self).__name__}: prepare() must be called before score()")
        if group[0].dep.target.module not in self._modules:
            raise ValueError(
                f"{type(self).__name__}: the group belongs to another model than the one given to prepare()"
            )
        n = len(group[0].idxs)
        z = None
        for i, (dep, idxs) in enumerate(group):
            stats = self._stats.get(dep.target.module)
            if stats is None:
                continue
            handler = getattr(dep.handler, "__name__", "")
            if "gate" in kinds and stats.gate is not None and handler == "prune_out_channels":
                values = stats.gate
            elif "out" in kinds and stats.out is not None and handler == "prune_out_channels":
                values = stats.out
            elif "inp" in kinds and stats.inp is not None and handler == "prune_in_channels":
                values = stats.inp
            else:
                continue
            pairs = [(int(m), int(r)) for m, r in zip(idxs, group[i].root_idxs) if r is not None]
            if not pairs:
                continue
            member, root = (torch.tensor(t, device=values.device) for t in zip(*pairs))
            if z is None:  # on the statistics' device (the model's)
                z = torch.zeros(values.shape[0], n, dtype=torch.float64, device=values.device)
            z.index_add_(1, root, values[:, member])
        return z

    @staticmethod
    def _reduce(z: torch.Tensor) -> torch.Tensor:
        return z.pow(2).mean(0).float().cpu()


@register_importance("taylor", needs_calibration=True)
class TaylorImportance(_TaylorBase):
    """First-order Taylor on weights (Molchanov 2019): (sum over the channel's conv/linear
    weights of w * dL/dw)^2, averaged over calibration batches."""

    def score(self, group: Any) -> torch.Tensor:
        z = self._group_terms(group, ("out", "inp"))
        if z is None:
            return torch.zeros(len(group[0].idxs))
        return self._reduce(z)


@register_importance("taylor_bn", needs_calibration=True)
class TaylorBNImportance(_TaylorBase):
    """FO-BN Taylor (Molchanov 2019): the BN layer is the channel's gate;
    (gamma * dL/dgamma + beta * dL/dbeta)^2 averaged over calibration batches, summed over
    the group's BN layers. Groups without BatchNorm fall back to weight Taylor (logged)."""

    def score(self, group: Any) -> torch.Tensor:
        z = self._group_terms(group, ("gate",)) if has_batchnorm(group) else None
        if z is None:
            root = group[0].dep.target.module
            log.info("taylor_bn: group rooted at %s has no BatchNorm gate; using weight Taylor", type(root).__name__)
            z = self._group_terms(group, ("out", "inp"))
        if z is None:
            return torch.zeros(len(group[0].idxs))
        return self._reduce(z)

