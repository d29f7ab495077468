"""Dynamic channel masking (after Li et al. 2020, "AutoPruning with Dynamic Channel Masking").

Every channel group gets a learnable remaining ratio ``r_g = r_min + (r_max - r_min) *
sigmoid(theta_g)`` over the space's ratio range, initialised at the ``start`` heuristic's
allocation scaled to the target (uniform by default, or Torch-Pruning global pruning's).
Its channels are ranked by an importance criterion (re-ranked every few steps as the
weights move) and channel ``c`` of ``C`` is multiplied by the soft mask
``sigmoid((r_g * C - rank_c - 0.5) / tau)``, so the ratio is differentiable; ``tau``
anneals towards a hard mask. The loss is the task loss (+ optional distillation from the
unpruned model) plus ``lambda * |FLOPs(r) / FLOPs_0 - target|`` where
FLOPs(r) is the space's exact cost model evaluated on real-valued kept counts. Weights are
updated on training batches and ratios on held-out batches, alternately. The student runs
with batch statistics in its norm layers, so a masked channel is charged what it costs once
the norms re-adapt, as the evaluation's recovery (adaptive BN, compensation) lets them.

The learned ratios are scaled by one common factor to the target's FLOPs (keeping the
learned allocation), snapped to the space's grid and nudged (greedily, one grid step at a
time, on the exact cost model) until the FLOPs ratio is within ``tolerance`` of the target
(with ``snap = "below"``: at most the target, within ``tolerance`` under it).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn

from evaluators.batch import Batch, call
from evaluators.heuristics import HEURISTICS, available_heuristics, heuristic_policies
from evaluators.importance import make_importance
from evaluators.losses import cross_entropy, kd_loss

Loss = Callable[[Any, torch.Tensor], torch.Tensor]            # (output, targets) -> loss
Distill = Callable[[Any, Any, float], torch.Tensor]           # (student, teacher, temperature) -> loss
from evaluators.prune import unit_scores
from spaces.checks import check_bool, check_choice, check_int, check_number, check_str
from spaces.groups import build_graph, root_pruning_group
from spaces.policy import Policy

log = logging.getLogger(__name__)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


#: how a run's learned allocation is snapped to the grid at its target (``snap_to_target``)
SNAPS = ("nearest", "below")


@dataclass(frozen=True)
class MaskingSchedule:
    """How a masking run trains: the hyper-parameters every run of a searcher shares."""

    steps: int = 150               # alternating (weight step, ratio step) pairs
    tau_start: float = 4.0         # mask temperature, in channels
    tau_end: float = 0.25
    weight_lr: float = 0.003
    ratio_lr: float = 0.1
    rerank_every: int = 10
    kd: bool = True                # distil from the unpruned model
    temperature: float = 4.0
    tolerance: float = 0.01        # final FLOPs-ratio tolerance after snapping
    snap: str = "nearest"          # "nearest": within tolerance either side of the target; "below": at most the target

    def __post_init__(self) -> None:
        self._check_steps()
        check_number("masking tau_start", self.tau_start, positive=True)
        check_number("masking tau_end", self.tau_end, positive=True)
        if self.tau_end > self.tau_start:
            raise ValueError(f"masking tau schedule needs 0 < tau_end <= tau_start, got {self.tau_start}, {self.tau_end}")
        check_number("masking weight_lr", self.weight_lr, positive=True)
        check_number("masking ratio_lr", self.ratio_lr, positive=True)
        check_int("masking rerank_every", self.rerank_every, 1)
        check_bool("masking kd", self.kd)
        check_number("masking temperature", self.temperature, positive=True)
        check_number("masking tolerance", self.tolerance, 0.0)
        check_choice("masking snap", self.snap, SNAPS)

    def _check_steps(self) -> None:
        check_int("masking steps", self.steps, 1)

    def schedule(self, **changes: Any) -> "MaskingSchedule":
        """Just the schedule's fields (of a subclass: its run config or searcher options), with ``changes``."""
        return MaskingSchedule(**{**{f.name: getattr(self, f.name) for f in fields(MaskingSchedule)}, **changes})


def check_start(start: Any) -> str:
    """A run's start: the name of a heuristic (``evaluators.heuristics``)."""
    if start not in HEURISTICS:
        raise ValueError(f"masking start must be one of {', '.join(available_heuristics())}, got {start!r}")
    return start


def check_target(target: Any) -> float:
    value = check_number("masking target", target)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"masking target must be a FLOPs ratio in (0, 1], got {target!r}")
    return value


@dataclass(frozen=True)
class MaskingConfig(MaskingSchedule):
    """One masking run: its FLOPs target, penalty weight, ranking criterion and seed."""

    target: float = 0.5            # FLOPs ratio to reach, in (0, 1]
    lam: float = 20.0              # weight of the FLOPs penalty, >= 0
    method: str = "l1"
    seed: int = 0
    start: str = "uniform"         # initial allocation: this heuristic's at the target

    def __post_init__(self) -> None:
        super().__post_init__()
        check_start(self.start)
        check_target(self.target)
        check_number("masking lambda", self.lam, 0.0)
        check_str("masking method", self.method)
        check_int("masking seed", self.seed, 0)


class _GroupMask:
    """Soft mask of one group, applied by forward hooks on the layers carrying its channels.

    The mask has one entry per unit of the group (a channel, or a whole attention head or
    normalisation group of ``unit`` channels, ``spaces.units``): a unit is kept or removed
    as one, as pruning does.
    """

    def __init__(self, channels: int, unit: int, targets: list[tuple[nn.Module, list[int], list[int]]]):
        self.channels = channels
        self.unit = unit
        self.targets = targets          # (module, target channel idxs, matching root channel idxs)
        self.rank = torch.arange(channels, dtype=torch.float32)
        self.mask = torch.ones(channels)

    def set(self, ratio: torch.Tensor, tau: float) -> None:
        self.mask = torch.sigmoid((ratio * self.channels - self.rank - 0.5) / tau)

    def hook(self, idxs: list[int], root_idxs: list[int], last_dim: bool):
        index = torch.tensor(idxs)
        source = torch.tensor(root_idxs)

        def masked(output: torch.Tensor) -> torch.Tensor:
            size = output.shape[-1] if last_dim else output.shape[1]
            per_channel = self.mask.repeat_interleave(self.unit) if self.unit > 1 else self.mask
            full = torch.ones(size, dtype=output.dtype)
            full = full.index_put((index,), per_channel[source].to(output.dtype))
            shape = [1] * output.dim()
            shape[-1 if last_dim else 1] = size
            return output * full.view(shape)

        def apply(module, inputs, output):
            if isinstance(output, tuple):   # nn.MultiheadAttention: (output, weights)
                return (masked(output[0]), *output[1:])
            return masked(output)

        return apply


def _mask_targets(graph, model: nn.Module, group_name: str, width: int):
    """Layers whose outputs carry the group's channels, with their channel index maps.

    A conv/linear feeding a norm layer of the same group is skipped: the norm's output is
    masked instead (after its bias), so a masked channel is really zero downstream.
    """
    root = dict(model.named_modules())[group_name]
    full = root_pruning_group(graph, root, range(width))
    items = [item for item in full if graph.is_out_channel_pruning_fn(item.dep.handler)]
    in_group = {id(item.dep.target) for item in items}
    targets = []
    for item in items:
        node = item.dep.target
        module = node.module
        if not isinstance(module, nn.Module):
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and any(
            isinstance(o.module, _NORMS) and id(o) in in_group for o in node.outputs
        ):
            continue
        targets.append((module, list(item.idxs), list(item.root_idxs)))
    return targets


class _MaskedStudent:
    """A training copy of the model with a soft mask on every group and learnable ratios.

    The student trains with batch statistics in its norm layers: with the unpruned model's
    running statistics every masked channel shifts the next norm's input off its stored
    mean, so the ratio gradients would measure how a pruned model does *without* BN
    recalibration rather than what the evaluation's recovery leaves.
    """

    def __init__(self, model: nn.Module, space: Any, example_inputs: torch.Tensor, config: MaskingConfig,
                 heldout: Sequence[Batch], loss: Loss = cross_entropy, distill: Distill = kd_loss) -> None:
        self.config = config
        self.loss, self.distill = loss, distill
        self.space = space
        self.groups = list(space.groups)
        self.teacher = copy.deepcopy(model).eval()
        self.student = copy.deepcopy(model).train()
        self.graph = build_graph(self.student, example_inputs)
        self.student.train()  # build_graph traces in eval mode and leaves the model there
        self.masks = [_GroupMask(g.channels, g.unit, _mask_targets(self.graph, self.student, g.name, g.width))
                      for g in self.groups]
        last_dim = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention, nn.Embedding)   # channels on the last axis
        self.handles = [
            module.register_forward_hook(gm.hook(idxs, root_idxs, last_dim=isinstance(module, last_dim)))
            for gm in self.masks for module, idxs, root_idxs in gm.targets
        ]
        self.criterion = make_importance(config.method)
        if self.criterion.needs_calibration:
            self.criterion.prepare(self.student, list(heldout), None)
        self.channels = torch.tensor([float(g.channels) for g in self.groups])
        self.base_flops = float(space.base_cost.flops)
        self.theta = nn.Parameter(self._initial_logits(model, example_inputs))
        self.weights = [p for p in self.student.parameters() if p.requires_grad]
        self.w_opt = torch.optim.SGD(self.weights, lr=config.weight_lr, momentum=0.9)
        # plain SGD, not Adam: Adam would normalise away the per-group FLOPs gradient scale
        # that makes expensive groups shrink faster than cheap ones
        self.r_opt = torch.optim.SGD([self.theta], lr=config.ratio_lr, momentum=0.9)

    def _initial_logits(self, model: nn.Module, example_inputs: Any) -> torch.Tensor:
        # Every group starts at the start heuristic's allocation scaled to the target: the
        # search then trades channels between groups instead of spending its steps shrinking
        # the model. uniform: one ratio; global_magnitude / global_lamp: Torch-Pruning's
        # global ranking of the base model's channels.
        r_min, r_max = self.space.ratio_min, self.space.ratio_max
        if self.config.start == "uniform":   # the same allocation as the heuristic's, without its FLOPs search
            start = Policy(ratios={g.name: 1.0 for g in self.groups})
        else:
            (start,) = heuristic_policies(self.config.start, self.space,
                                          [max(self.config.target, self.space.min_flops_ratio)],
                                          model=model, example_inputs=example_inputs, on_grid=False)
        start = scale_to_target(self.space, start, self.config.target)
        logits = []
        for g in self.groups:
            p = min(max((start.ratio(g.name) - r_min) / (r_max - r_min), 1e-3), 1 - 1e-3) if r_min < r_max else 0.5
            logits.append(math.log(p / (1 - p)))
        return torch.tensor(logits)

    def ratios(self) -> torch.Tensor:
        r_min, r_max = self.space.ratio_min, self.space.ratio_max
        return r_min + (r_max - r_min) * torch.sigmoid(self.theta)

    def rerank(self) -> None:
        """Rank each group's channels by the criterion on the current weights."""
        modules = dict(self.student.named_modules())
        for g, gm in zip(self.groups, self.masks):
            scores = self.criterion.score(root_pruning_group(self.graph, modules[g.name], range(g.width)))
            scores = unit_scores(scores.detach().float(), g) if g.unit > 1 else scores
            order = torch.argsort(scores.double(), descending=True, stable=True)
            rank = torch.empty(g.channels)
            rank[order] = torch.arange(g.channels, dtype=torch.float32)
            gm.rank = rank

    def _task_loss(self, x: Any, y: torch.Tensor, ratios: torch.Tensor, tau: float) -> torch.Tensor:
        for gm, ratio in zip(self.masks, ratios):
            gm.set(ratio, tau)
        out = call(self.student, x)   # a tensor, tuple or dict of inputs (evaluators.batch)
        loss = self.loss(out, y)
        if self.config.kd:
            with torch.no_grad():
                teacher_out = call(self.teacher, x)
            loss = loss + self.distill(out, teacher_out, self.config.temperature)
        return loss

    def weight_step(self, batch: Batch, tau: float) -> None:
        """One step on the weights, ratios fixed (training data)."""
        self.w_opt.zero_grad()
        self._task_loss(*batch, self.ratios().detach(), tau).backward()
        nn.utils.clip_grad_norm_(self.weights, 5.0)  # soft masks can spike gradients early on
        self.w_opt.step()

    def ratio_step(self, batch: Batch, tau: float) -> tuple[float, float]:
        """One step on the ratios, weights fixed (held-out data); returns (loss, FLOPs ratio)."""
        ratios = self.ratios()
        loss = self._task_loss(*batch, ratios, tau)
        flops_ratio = self.space.cost_model.flops_torch(ratios * self.channels) / self.base_flops
        loss = loss + self.config.lam * (flops_ratio - self.config.target).abs()
        self.r_opt.zero_grad()
        self.student.zero_grad(set_to_none=True)
        loss.backward()
        self.r_opt.step()
        return loss.item(), flops_ratio.item()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def learn_ratios(
    model: nn.Module,
    space: Any,
    train_batches: Sequence[Batch],
    heldout_batches: Sequence[Batch],
    example_inputs: torch.Tensor,
    config: MaskingConfig = MaskingConfig(),
    loss: Loss = cross_entropy,
    distill: Distill = kd_loss,
) -> tuple[Policy, dict[str, Any]]:
    """Learn per-group remaining ratios for ``config.target``; returns (policy, info).

    ``loss`` and ``distill`` are the task's (``evaluators.losses.task_loss`` /
    ``task_distill``; default cross-entropy and logit distillation).

    ``model`` is not modified (a copy is trained). ``info`` holds the raw learned ratios,
    the predicted FLOPs ratio before and after snapping, and the loss trace.
    """
    if space.cost_model is None:
        raise ValueError("dynamic channel masking needs a search space with a cost model")
    if not train_batches or not heldout_batches:
        raise ValueError("dynamic channel masking needs training and held-out batches")
    torch.manual_seed(config.seed)
    run = _MaskedStudent(model, space, example_inputs, config, heldout_batches, loss, distill)
    trace = []
    try:
        for step in range(config.steps):
            tau = config.tau_start * (config.tau_end / config.tau_start) ** (step / max(1, config.steps - 1))
            if step % config.rerank_every == 0:
                run.rerank()
            run.weight_step(train_batches[step % len(train_batches)], tau)
            trace.append(run.ratio_step(heldout_batches[step % len(heldout_batches)], tau))
    finally:
        run.close()
    learned = {g.name: float(v) for g, v in zip(space.groups, run.ratios().detach())}
    policy = policy_at_target(space, learned, config.target, config.method, config.tolerance, config.snap)
    info = {
        "learned_ratios": learned,
        "learned_flops_ratio": space.cost_model.predict(
            {g.name: g.channels * learned[g.name] for g in space.groups}).flops / space.base_cost.flops,
        "flops_ratio": space.flops_ratio(policy),
        "final_loss": trace[-1][0] if trace else math.nan,
        "target": config.target,
    }
    return policy, info


def policy_at_target(space: Any, learned: Mapping[str, float], target: float, method: str,
                     tolerance: float = 0.01, snap: str = "nearest") -> Policy:
    """The grid policy at ``target`` FLOPs for a run's learned (continuous) ratios.

    Few ratio steps leave the learned FLOPs off the target (the task loss pulls every ratio
    up). Rescaling all ratios by one factor first keeps the learned allocation; the greedy
    grid snap alone would take the whole gap out of the groups with most FLOPs per step.
    The same allocation can be placed at any target this way (masking ``all_targets``).
    """
    raw = Policy(ratios={n: min(1.0, max(float(v), 1e-6)) for n, v in learned.items()}, method=method)
    return snap_to_target(space, scale_to_target(space, raw, target), target, tolerance, snap)


def scale_to_target(space: Any, policy: Policy, target: float) -> Policy:
    """Multiply every ratio by one factor (clipped to the space's range) so that the
    continuous FLOPs ratio is ``target``: keeps the learned allocation between groups."""
    names = list(space.group_names)
    channels = torch.tensor([float(g.channels) for g in space.groups])
    ratios = torch.tensor([policy.ratio(n) for n in names], dtype=torch.float32)
    base = float(space.base_cost.flops)

    def scaled(factor: float) -> torch.Tensor:
        return (ratios * factor).clamp(space.ratio_min, space.ratio_max)

    def flops(factor: float) -> float:
        return float(space.cost_model.flops_torch(scaled(factor) * channels)) / base

    lo, hi = 0.0, space.ratio_max / max(float(ratios.min()), 1e-6)
    with torch.no_grad():
        if flops(hi) > target:
            for _ in range(40):  # FLOPs grow monotonically with the factor
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if flops(mid) > target else (mid, hi)
            hi = (lo + hi) / 2
    return Policy(ratios=dict(zip(names, scaled(hi).tolist())), method=policy.method)


def snap_to_target(space: Any, policy: Policy, target: float, tolerance: float = 0.01,
                   snap: str = "nearest") -> Policy:
    """Snap ``policy`` to the grid, then move single groups one grid step at a time (the move
    that brings the exact FLOPs ratio closest to ``target``) until within ``tolerance``;
    with ``snap = "below"``, until at most ``target`` and within ``tolerance`` under it (a target that
    is a FLOPs budget: any ratio above it counts as further off than every one below)."""
    levels = list(space.levels)
    idx = {n: levels.index(space.snap(policy.ratio(n))) for n in space.group_names}

    def flops_ratio(ix: dict[str, int]) -> float:
        return space.flops_ratio(Policy(ratios={n: levels[i] for n, i in ix.items()}, method=policy.method))

    def error(value: float) -> float:
        if snap == "below" and value > target:
            return 1.0 + value - target
        return abs(value - target)

    current = flops_ratio(idx)
    for _ in range(4 * len(levels) * len(idx)):  # each move strictly reduces the error
        if error(current) <= tolerance:
            break
        direction = -1 if current > target else 1
        best = None
        for n, i in idx.items():
            j = i + direction
            if 0 <= j < len(levels):
                trial = dict(idx, **{n: j})
                value = flops_ratio(trial)
                if best is None or error(value) < error(best[1]):
                    best = (trial, value)
        if best is None or error(best[1]) >= error(current):
            break
        idx, current = best
    return Policy(ratios={n: levels[i] for n, i in idx.items()}, method=policy.method)
