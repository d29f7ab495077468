"""Prunable channel groups of a model, found with torch_pruning's DependencyGraph.

A *group* is a set of coupled channels that must be removed together (a conv, its BN,
every layer joined to it by a residual add, a depthwise conv, the consumers' input
slices, concatenation slices). It is named by the qualified name of its root module —
the first conv/linear whose output channels start the group — which is stable across
deep copies of the same architecture.

Most groups are pruned channel by channel. A group whose channels feed layers that count
blocks of them (GroupNorm groups, attention heads: ``spaces.units``) is pruned in whole
blocks: its ``channels`` are then those *units* (heads, normalisation groups), ``unit`` is
channels per unit, and ``prune_group`` keeps the counting attributes (``num_heads``,
``num_groups``) in step. Ratios, kept counts and the cost model all work in units, so what a
space predicts for a kept count is what pruning builds.

Attention whose q/k are rotated (``spaces.units.head_layouts``: Hugging Face Llama and kin)
is never a root of torch_pruning's search, which would not end; its heads are a group
built here (``heads=True``, units of one key/value head with its query heads), and
``root_pruning_group`` builds their torch_pruning group by hand for pruning and scoring.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from spaces.units import (HEAD_ATTRS, BlockCount, HeadLayout, block_counts, counts_match, head_layouts, set_counts,
                          unit_channels, unit_of, untraceable_roots)

log = logging.getLogger(__name__)

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class ChannelGroup:
    """One independently prunable set of coupled channels, pruned in units of ``unit``."""

    name: str
    channels: int  # pruning units: channels, or whole heads / normalisation groups
    members: tuple[str, ...]  # modules whose output channels are these channels
    unit: int = 1  # channels per unit
    counts: tuple[BlockCount, ...] = ()  # attributes counting blocks of these channels
    heads: bool = False  # units are attention heads with no counting attribute (a HeadLayout's)

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError(f"group {self.name!r} has {self.channels} channels")
        if self.unit < 1:
            raise ValueError(f"group {self.name!r} has unit {self.unit}")

    @property
    def width(self) -> int:
        """Channels of the group's root layer (``channels * unit``)."""
        return self.channels * self.unit


def forward(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` on inputs given as a tensor, a tuple/list of args or a kwargs dict."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def forward_with_hooks(model: nn.Module, example_inputs: Any, modules: Iterable[tuple[str, nn.Module]],
                       on_output: Callable[[str, Any], None]) -> Any:
    """``model``'s outputs on ``example_inputs`` (no gradients), calling ``on_output(name,
    output)`` as each of ``modules`` produces its output; the hooks are gone afterwards."""
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: on_output(n, out)) for n, m in modules]
    try:
        with torch.no_grad():
            return forward(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()


def _output_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _output_tensors(o)]
    return []


def _storage_address(t: torch.Tensor) -> int | None:
    """Address of the memory ``t`` views (None for an empty storage, which has none of its own)."""
    storage = t.untyped_storage()
    return storage.data_ptr() if storage.nbytes() else None


def output_layers(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the conv/linear layers whose outputs are (views of) the model's outputs.

    Their output channels are the model's output shape, so they are never pruned.
    A layer's output is matched to the model's outputs by storage address, so every layer
    output is held until the comparison: a freed output's memory is reused by later tensors
    (the model's outputs too), and matching a dead address would name layers that merely
    ran earlier, differently in each process. (Holding them costs what a training forward
    keeps for one batch of ``example_inputs``.)
    """
    produced: list[tuple[str, torch.Tensor]] = []
    roots = [(n, m) for n, m in model.named_modules() if isinstance(m, ROOT_TYPES)]
    outputs = _output_tensors(forward_with_hooks(
        model, example_inputs, roots, lambda name, out: produced.extend((name, t) for t in _output_tensors(out))))
    addresses = {_storage_address(t) for t in outputs} - {None}
    names = [n for n, t in produced if _storage_address(t) in addresses]
    del produced  # release the held layer outputs before the fallback's forward
    if not names:
        # Output is not a view of a layer's output (e.g. a softmax); fall back to the last
        # conv/linear executed, which is what decides the output width in such models.
        order: list[str] = []
        forward_with_hooks(model, example_inputs, roots, lambda name, out: order.append(name))
        names = order[-1:]
    return sorted(set(names))


def build_graph(model: nn.Module, example_inputs: Any, ignored: Sequence[nn.Module] = ()) -> tp.DependencyGraph:
    """Trace ``model`` into a torch_pruning dependency graph."""
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs, ignored_layers=list(ignored), verbose=False
        )


def _is_grouped_conv(module: nn.Module) -> bool:
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or module.groups == 1:
        return False
    return not (module.groups == module.in_channels == module.out_channels)  # depthwise is fine


def out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def root_pruning_group(graph: tp.DependencyGraph, root: nn.Module, idxs: Sequence[int]):
    """The torch_pruning group removing output channels ``idxs`` of ``root`` (for the q
    projection of a ``HeadLayout``, built by hand: torch_pruning's search would not end)."""
    layout = head_layouts(graph.model).get(graph._module2name.get(root, ""))
    if layout is not None:
        return _layout_group(graph, layout, list(idxs))
    pruner = graph.get_pruner_of_module(root)
    return graph.get_pruning_group(root, pruner.prune_out_channels, list(idxs))


def _layout_group(graph: tp.DependencyGraph, layout: HeadLayout, idxs: list[int]):
    """A torch_pruning group removing q channels ``idxs`` (whole units of ``layout``), the
    k/v channels of their key/value heads and o's matching input columns; every item's
    ``root_idxs`` are q channels, so importance criteria score per q channel as usual."""
    modules = dict(graph.model.named_modules())
    kv = layout.kv_channels(idxs)
    items = [(layout.q, "out", idxs, idxs), (layout.o, "in", idxs, idxs)]
    items += [(n, "out", [c for c, _ in kv], [r for _, r in kv]) for n in (layout.k, layout.v)]
    group = tp.dependency.Group()
    for name, side, member_idxs, root_idxs in items:
        module = modules[name]
        pruner = graph.get_pruner_of_module(module)
        fn = pruner.prune_out_channels if side == "out" else pruner.prune_in_channels
        node = graph.module2node[module]
        group.add_dep(tp.dependency.Dependency(fn, fn, source=node, target=node), member_idxs)
        group[len(group) - 1].root_idxs = list(root_idxs)
    group._DG = graph
    return group


def prune_group(graph: tp.DependencyGraph, modules: dict[str, nn.Module], group: ChannelGroup,
                units: Sequence[int]) -> None:
    """Remove the pruning units ``units`` of ``group`` (whole blocks of ``group.unit``
    channels) and set the attributes counting its blocks to the kept width."""
    root = modules[group.name]
    idxs = unit_channels(units, group.unit)
    set_counts(group.counts, modules, out_channels(root) - len(idxs))  # before: MHA's check reads num_heads
    root_pruning_group(graph, root, idxs).prune()


def kept_as_asked(modules: dict[str, nn.Module], group: ChannelGroup, kept_units: int) -> bool:
    """Whether ``group``'s root and counting attributes show ``kept_units`` units."""
    width = kept_units * group.unit
    return out_channels(modules[group.name]) == width and counts_match(group.counts, modules, width)


def check_keeps_a_head(groups: Iterable[ChannelGroup], ratio: float, name: str = "ratio") -> None:
    """``ValueError`` when remaining ``ratio`` would keep no unit of a group of attention
    heads (kept units are ``round(ratio * units)``, as ``spaces.space.kept_channels`` rounds):
    an attention layer cannot lose its last head. Channel and GroupNorm groups are clamped to
    one unit instead, as they always were."""
    for g in groups:
        if (g.heads or any(c.attr in HEAD_ATTRS for c in g.counts)) and round(ratio * g.channels) < 1:
            raise ValueError(f"{name} {ratio:g} keeps no head of group {g.name!r} ({g.channels} units of whole heads): "
                             f"{name} must be > {0.5 / g.channels:g}")


def _candidate(graph: tp.DependencyGraph, group, names: dict[nn.Module, str],
               modules: dict[str, nn.Module]) -> ChannelGroup | str:
    """The ChannelGroup of a torch_pruning group, or why it is excluded."""
    members: list[str] = []
    touched: list[tuple[str, bool]] = []
    for dep, _ in group:
        target = dep.target.module
        if not (isinstance(target, nn.Module) and target in names):
            continue
        member, out = names[target], graph.is_out_channel_pruning_fn(dep.handler)
        touched.append((member, out))
        if out and member not in members:
            members.append(member)  # layers whose outputs carry the group's channels
        if _is_grouped_conv(target):
            return f"touches grouped conv {member!r} (groups={target.groups}), which torch_pruning cannot prune channel-wise"
    root = group[0].dep.target.module
    counts = block_counts(touched, modules)
    unit, width = unit_of(counts), out_channels(root)
    if width % unit:
        return f"its {width} channels are not whole blocks of {unit} ({', '.join(f'{c.module}.{c.attr}' for c in counts)})"
    if width // unit < 2:
        return "has a single channel" if unit == 1 else f"has a single block of {unit} channels"
    return ChannelGroup(name=names[root], channels=width // unit, members=tuple(members), unit=unit, counts=counts)


def _structural_groups(model: nn.Module, example_inputs: Any, ignored_names: set[str]):
    """Candidate groups from the graph, with rule-based exclusions logged."""
    modules = dict(model.named_modules())
    ignored = [modules[n] for n in ignored_names]
    graph = build_graph(model, example_inputs, ignored)
    names = {m: n for n, m in model.named_modules()}
    untraceable = untraceable_roots(model)
    layouts = {n for lay in head_layouts(model).values() for n in (lay.q, lay.k, lay.v)}
    for name, reason in untraceable.items():
        log.info("channel group %r %s: %s", name, "laid out by hand" if name in layouts else "excluded", reason)
    roots_skipped = ignored + [modules[n] for n in untraceable if n not in ignored_names]  # never searched from
    candidates: list[ChannelGroup] = []
    for group in graph.get_all_groups(ignored_layers=roots_skipped, root_module_types=ROOT_TYPES):
        found = _candidate(graph, group, names, modules)
        if isinstance(found, str):
            log.info("channel group %r excluded: %s", names[group[0].dep.target.module], found)
            continue
        candidates.append(found)
    for layout in head_layouts(model).values():  # rotary attention: heads grouped by hand
        if {layout.q, layout.k, layout.v, layout.o} & ignored_names:
            log.info("channel group %r excluded: its attention's projections are ignored", layout.q)
            continue
        q = modules[layout.q]
        candidates.append(ChannelGroup(name=layout.q, channels=q.out_features // (layout.repeat * layout.head_dim),
                                       members=(layout.q, layout.k, layout.v), unit=layout.repeat * layout.head_dim,
                                       heads=True))
    return candidates


def _probe(model: nn.Module, example_inputs: Any, groups: list[ChannelGroup]) -> str | None:
    """Remove one unit of every group on a copy; return the first group that fails."""
    work = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref = [t.shape for t in _output_tensors(forward(work, example_inputs))]
    graph = build_graph(work, example_inputs)
    modules = dict(work.named_modules())
    for g in groups:
        try:
            prune_group(graph, modules, g, [0])
            with torch.no_grad():
                shapes = [t.shape for t in _output_tensors(forward(work, example_inputs))]
        except Exception as exc:  # torch_pruning raises on patterns it cannot handle
            log.info("channel group %r excluded: pruning it raised %s: %s", g.name, type(exc).__name__, exc)
            return g.name
        if not kept_as_asked(modules, g, g.channels - 1) or shapes != ref:
            log.info("channel group %r excluded: torch_pruning kept a different channel count than asked", g.name)
            return g.name
    return None


def discover_groups(
    model: nn.Module, example_inputs: Any, ignored: Iterable[str] = ()
) -> list[ChannelGroup]:
    """Every independently prunable channel group of ``model``.

    The layers producing the model's outputs and the modules named in ``ignored`` are
    never pruned. Groups torch_pruning cannot prune correctly (checked by removing one
    channel of each on a copy) are excluded with a logged reason. Raises ``ValueError``
    for an unknown ignored name or a model without any prunable group.
    """
    ignored = list(ignored)
    modules = dict(model.named_modules())
    for name in ignored:
        if name not in modules:
            raise ValueError(f"unknown module {name!r} in ignored layers")
    was_training = model.training
    model.eval()
    try:
        ignored_names = set(ignored) | set(output_layers(model, example_inputs))
        groups = _structural_groups(model, example_inputs, ignored_names)
        while groups:
            bad = _probe(model, example_inputs, groups)
            if bad is None:
                break
            groups = [g for g in groups if g.name != bad]
    finally:
        model.train(was_training)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    groups.sort(key=lambda g: order[g.name])
    if not groups:
        raise ValueError(
            f"model {type(model).__name__} has no prunable channel group "
            "(only output layers, ignored layers or unsupported patterns)"
        )
    return groups
