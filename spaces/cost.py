"""Analytic FLOPs and parameter counts of a policy, without building the pruned model.

Every channel dimension in a pruned network is an affine function of the kept channel
counts of the groups (a concat sums slices, a flatten multiplies by the spatial size).
``CostModel.build`` measures those functions once: it removes one channel of each group in
turn on a copy of the model and records how every layer's input/output/weight shapes move.
A layer's FLOPs (counted exactly as ``torch_pruning.utils.count_ops_and_params`` counts
them: multiply-accumulates per sample) and every parameter's size are then products of
those affine dimensions, so predictions are exact up to integer rounding.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from spaces.groups import ChannelGroup, build_graph, forward, root_pruning_group

# A FLOPs term is coef * product of dims (by index into the recorded dim table).
Term = tuple[float, tuple[int, ...]]


@dataclass(frozen=True)
class Cost:
    """FLOPs (multiply-accumulates per sample) and parameter count of a model."""

    flops: float
    params: float


# -- per-layer FLOPs formulas (mirroring torch_pruning's op counter) -------------------------
# Each formula gets a ``dim(kind, i)`` function returning the index of a recorded dimension
# (kind in {"in", "out", "attr"}) and returns the layer's terms.
Formula = Callable[[nn.Module, Callable[..., int], tuple[int, ...], tuple[int, ...]], list[Term]]
_FORMULAS: dict[type, Formula] = {}


def _register(*types: type) -> Callable[[Formula], Formula]:
    def wrap(fn: Formula) -> Formula:
        for t in types:
            _FORMULAS[t] = fn
        return fn
    return wrap


@_register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(m, dim, in_shape, out_shape) -> list[Term]:
    spatial = tuple(dim("out", i) for i in range(1, len(out_shape)))
    k = float(math.prod(m.kernel_size))
    if m.groups > 1 and m.groups == m.in_channels == m.out_channels:
        # depthwise: groups follows the channels under pruning, in * (out // groups) = in
        terms = [(k, (dim("attr", 0),) + spatial)]
    else:  # grouped convs are never pruned (excluded at discovery), so groups is fixed
        terms = [(k / m.groups, (dim("attr", 0), dim("attr", 1)) + spatial)]
    if m.bias is not None:
        terms.append((1.0, (dim("attr", 1),) + spatial))
    return terms


@_register(nn.Linear)
def _linear(m, dim, in_shape, out_shape) -> list[Term]:
    ins = tuple(dim("in", i) for i in range(len(in_shape)))
    out_last = dim("out", len(out_shape) - 1)
    terms = [(1.0, ins + (out_last,))]
    if m.bias is not None:
        terms.append((1.0, (out_last,)))
    return terms


def _numel(kind: str, factor: Callable[[nn.Module], float]) -> Formula:
    def formula(m, dim, in_shape, out_shape) -> list[Term]:
        shape = in_shape if kind == "in" else out_shape
        return [(factor(m), tuple(dim(kind, i) for i in range(len(shape))))]
    return formula


_register(nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6, nn.GELU)(_numel("out", lambda m: 1.0))
_register(nn.Upsample)(_numel("out", lambda m: 1.0))
_register(
    nn.MaxPool1d, nn.AvgPool1d, nn.MaxPool2d, nn.AvgPool2d, nn.MaxPool3d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool3d,
)(_numel("in", lambda m: 1.0))
_register(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.GroupNorm,
)(_numel("in", lambda m: 2.0 if m.affine else 1.0))
_register(nn.LayerNorm)(_numel("in", lambda m: 2.0 if m.elementwise_affine else 1.0))


def layer_kind(m: nn.Module) -> str:
    """Coarse compute class of a layer, for latency models: kernels of one class run at
    similar speed per FLOP, kernels of different classes (a dense 3x3 conv vs a depthwise conv
    vs a memory-bound batch norm) do not."""
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if m.groups > 1 and m.groups == m.in_channels == m.out_channels:
            return "depthwise"
        return "conv1x1" if math.prod(m.kernel_size) == 1 else "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    return "elementwise"


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x:
        return _first_tensor(x[0])
    return None


class _ShapeRecorder:
    """Forward hooks that record per-sample input/output shapes of every counted layer."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def snapshot(self, example_inputs: Any) -> dict[tuple, int]:
        self.shapes = {}
        hooks = []
        for name, module in self.model.named_modules():
            if type(module) in _FORMULAS:
                def hook(mod, inp, out, name=name):
                    i, o = _first_tensor(inp), _first_tensor(out)
                    if i is not None and o is not None:
                        self.shapes[name] = (tuple(i.shape[1:]), tuple(o.shape[1:]))
                hooks.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                forward(self.model, example_inputs)
        finally:
            for h in hooks:
                h.remove()
        values: dict[tuple, int] = {}
        modules = dict(self.model.named_modules())
        for name, (ins, outs) in self.shapes.items():
            for i, v in enumerate(ins):
                values[(name, "in", i)] = v
            for i, v in enumerate(outs):
                values[(name, "out", i)] = v
            m = modules[name]
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                values[(name, "attr", 0)] = m.in_channels
                values[(name, "attr", 1)] = m.out_channels
        for pname, p in self.model.named_parameters():
            for i, v in enumerate(p.shape):
                values[(pname, "param", i)] = v
        return values


@dataclass(frozen=True)
class CostModel:
    """Affine channel dimensions + FLOPs/params formulas over them."""

    group_names: tuple[str, ...]
    group_channels: tuple[int, ...]
    base_dims: np.ndarray          # (D,)
    slopes: np.ndarray             # (G, D): change of each dim per removed channel of group g
    flops_terms: tuple[Term, ...]
    param_terms: tuple[tuple[int, ...], ...]
    base: Cost
    term_kinds: tuple[str, ...] = field(default=(), compare=False)  # layer_kind of each flops term

    @classmethod
    def build(cls, model: nn.Module, example_inputs: Any, groups: Sequence[ChannelGroup]) -> "CostModel":
        """Measure the cost model of ``model`` over ``groups`` (model left untouched).

        ``example_inputs`` should hold a batch of one sample (costs are per sample).
        """
        work = copy.deepcopy(model).eval()
        recorder = _ShapeRecorder(work)
        snaps = [recorder.snapshot(example_inputs)]
        base_shapes = dict(recorder.shapes)
        modules = dict(work.named_modules())
        graph = build_graph(work, example_inputs)
        for g in groups:
            root_pruning_group(graph, modules[g.name], [0]).prune()
            snaps.append(recorder.snapshot(example_inputs))
        keys = list(snaps[0])
        index = {k: i for i, k in enumerate(keys)}
        table = np.array([[s.get(k, 0) for k in keys] for s in snaps], dtype=np.float64)
        slopes = table[:-1] - table[1:]

        base_modules = dict(model.named_modules())
        terms: list[Term] = []
        kinds: list[str] = []
        for name, (in_shape, out_shape) in base_shapes.items():
            m = base_modules[name]
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups != 1:
                touched = slopes[:, index[(name, "attr", 1)]].any()
                if not (m.groups == m.in_channels == m.out_channels) and touched:
                    raise ValueError(f"cost model cannot follow grouped conv {name!r} under pruning")
            layer_terms = _FORMULAS[type(m)](m, lambda kind, i, n=name: index[(n, kind, i)], in_shape, out_shape)
            terms.extend(layer_terms)
            kinds.extend([layer_kind(m)] * len(layer_terms))
        params: list[tuple[int, ...]] = []
        seen: set[int] = set()
        for pname, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            params.append(tuple(index[(pname, "param", i)] for i in range(p.dim())))
        self = cls(
            group_names=tuple(g.name for g in groups),
            group_channels=tuple(g.channels for g in groups),
            base_dims=table[0],
            slopes=slopes,
            flops_terms=tuple(terms),
            param_terms=tuple(params),
            base=Cost(0.0, 0.0),
            term_kinds=tuple(kinds),
        )
        object.__setattr__(self, "base", self.predict({}))
        return self

    def dims(self, kept: Mapping[str, int]) -> np.ndarray:
        removed = np.array(
            [c - kept.get(n, c) for n, c in zip(self.group_names, self.group_channels)], dtype=np.float64
        )
        return self.base_dims - removed @ self.slopes

    def predict(self, kept: Mapping[str, int]) -> Cost:
        """Cost of the model when group ``name`` keeps ``kept[name]`` channels (others all)."""
        d = self.dims(kept)
        params = sum(float(np.prod(d[list(idx)])) for idx in self.param_terms)
        return Cost(flops=sum(self._term_flops(d)), params=params)

    def _term_flops(self, d: np.ndarray) -> list[float]:
        """FLOPs of every term at dimensions ``d``."""
        return [coef * float(np.prod(d[list(idx)])) for coef, idx in self.flops_terms]

    def flops_by_kind(self, kept: Mapping[str, int]) -> dict[str, float]:
        """FLOPs split by ``layer_kind`` (sums to ``predict(kept).flops``)."""
        out: dict[str, float] = {}
        for value, kind in zip(self._term_flops(self.dims(kept)), self.term_kinds):
            out[kind] = out.get(kind, 0.0) + value
        return out

    def flops_torch(self, kept: "torch.Tensor") -> "torch.Tensor":
        """Differentiable FLOPs for real-valued kept counts (one per group, in group order).

        Used by dynamic channel masking: the gradient of expected FLOPs w.r.t. each group's
        kept count, with exactly the same formula ``predict`` uses on integers.
        """
        # torch.tensor copies: arrays shipped through Ray's object store are read-only
        base = torch.tensor(self.base_dims, dtype=kept.dtype, device=kept.device)
        slopes = torch.tensor(self.slopes, dtype=kept.dtype, device=kept.device)
        channels = torch.as_tensor(self.group_channels, dtype=kept.dtype, device=kept.device)
        d = base - (channels - kept) @ slopes
        total = kept.new_zeros(())
        for coef, idx in self.flops_terms:
            total = total + coef * torch.prod(d[list(idx)])
        return total


def count_cost(model: nn.Module, example_inputs: Any) -> Cost:
    """FLOPs (MACs per sample) and params counted on a real model by torch_pruning."""
    import torch_pruning as tp

    flops, params = tp.utils.count_ops_and_params(model, example_inputs)
    return Cost(flops=float(flops), params=float(params))
