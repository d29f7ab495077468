"""apply_policy: a pruned deep copy of a model, channels really removed (torch_pruning)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from evaluators.batch import Batch
from evaluators.importance import make_importance, needs_calibration
from spaces.groups import ChannelGroup, build_graph, discover_groups, kept_as_asked, prune_group, root_pruning_group
from spaces.policy import Policy
from spaces.space import kept_channels

log = logging.getLogger(__name__)


def channels_to_remove(scores: torch.Tensor, kept: int) -> list[int]:
    """Indices of the ``len(scores) - kept`` lowest-scored channels (ties: lower index first)."""
    n_remove = len(scores) - kept
    if n_remove <= 0:
        return []
    order = torch.argsort(scores.double(), stable=True)
    return sorted(int(i) for i in order[:n_remove])


def unit_scores(scores: torch.Tensor, group: ChannelGroup) -> torch.Tensor:
    """Per-unit scores of ``group`` from its per-channel scores: the sum over each unit's
    channels (a whole head or normalisation group is kept or removed as one)."""
    if scores.numel() != group.width or not torch.isfinite(scores).all():
        raise ValueError(f"invalid scores for group {group.name!r}")
    return scores.reshape(group.channels, group.unit).sum(dim=1)


def _removals(graph, modules: dict[str, nn.Module], groups: Sequence[ChannelGroup], target: dict[str, int],
              policy: Policy, criteria: dict) -> dict[str, list[int]]:
    """The units each of ``groups`` removes, its lowest-scored units by the policy's criterion.

    Every group is scored on the unpruned copy first: indices of one group stay valid while
    other groups are removed, and scores do not depend on pruning order.
    """
    removals: dict[str, list[int]] = {}
    for g in groups:
        method = policy.method_for(g.name)
        full = root_pruning_group(graph, modules[g.name], range(g.width))
        try:
            scores = unit_scores(criteria[method].score(full), g)
        except ValueError:
            raise ValueError(f"method {method!r} gave invalid scores for group {g.name!r}") from None
        removals[g.name] = channels_to_remove(scores, target[g.name])
    return removals


def apply_policy(
    model: nn.Module,
    policy: Policy,
    example_inputs: Any,
    calibration: Sequence[Batch] | None = None,
    *,
    groups: Sequence[ChannelGroup] | None = None,
    round_to: int = 1,
    loss_fn: Callable | None = None,
) -> nn.Module:
    """Return a pruned deep copy of ``model``; ``model`` itself is never modified.

    ``groups`` are the discovered channel groups (discovered here when not given). Every
    group keeps ``kept_channels(channels, ratio, round_to)`` units (channels, or whole heads
    and normalisation groups: ``spaces.units``), chosen by the policy's importance criterion;
    the pruned copy's kept counts (and head/group counts) are checked against the policy
    and a mismatch raises ``ValueError`` rather than returning a mis-pruned model.
    """
    if groups is None:
        groups = discover_groups(model, example_inputs)
    by_name = {g.name: g for g in groups}
    policy.validate(by_name)
    methods = sorted(policy.methods_used())
    for m in methods:
        make_importance(m)  # ValueError for an unknown method, before any work
        if needs_calibration(m) and not calibration:
            raise ValueError(f"method {m!r} needs calibration batches; none were given")

    work = copy.deepcopy(model)
    target = {name: kept_channels(g.channels, policy.ratio(name), round_to) for name, g in by_name.items()}
    to_prune = [name for name, k in target.items() if k < by_name[name].channels]
    if not to_prune:
        return work

    was_training = model.training
    work.eval()
    criteria = {}
    for m in methods:
        criteria[m] = make_importance(m)
        criteria[m].prepare(work, calibration, loss_fn)
    graph = build_graph(work, example_inputs)
    modules = dict(work.named_modules())
    removals = _removals(graph, modules, [by_name[n] for n in to_prune], target, policy, criteria)
    for name, units in removals.items():
        prune_group(graph, modules, by_name[name], units)
    work.zero_grad(set_to_none=True)
    for name, k in target.items():
        if not kept_as_asked(modules, by_name[name], k):
            raise ValueError(f"torch_pruning did not keep {k} units of {by_name[name].unit} channels in group {name!r}")
    work.train(was_training)
    return work
