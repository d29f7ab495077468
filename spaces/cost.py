"""Analytic FLOPs and parameter counts of a policy, without building the pruned model.

Every channel dimension in a pruned network is an affine function of the kept channel
counts of the groups (a concat sums slices, a flatten multiplies by the spatial size).
``CostModel.build`` measures those functions once: it removes one channel of each group in
turn on a copy of the model and records how every layer's input/output/weight shapes move.
A layer's FLOPs (counted exactly as ``torch_pruning.utils.count_ops_and_params`` counts
them: multiply-accumulates per sample) and every parameter's size are then products of
those affine dimensions, so predictions are exact up to integer rounding.

Attention: ``nn.MultiheadAttention`` is counted term by term as torch_pruning counts it
(query scaling, q/k/v projections and bias, per head ``QK^T`` = ``qlen * klen * head_dim``,
softmax = ``qlen * klen``, ``attention x V`` = ``qlen * klen * v_head_dim``, output
projection). Any other attention module (``spaces.units.attention_modules``: hand-written,
Hugging Face ViT/BERT/Llama) has its q/k/v/out ``nn.Linear`` layers counted as layers, plus
the same three per-head products, which ``count_cost`` adds to torch_pruning's count (it
cannot see functional matmuls or ``scaled_dot_product_attention``); with grouped-query
attention ``attention x V`` counts every query head (value heads times ``num_key_value_groups``). The
sequence lengths are the example input's; a group of whole heads moves ``num_heads`` and
the q/k/v widths, so every term stays a product of affine dimensions.
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

from spaces.groups import ChannelGroup, build_graph, forward, forward_with_hooks, prune_group
from spaces.units import attention_heads, attention_modules, kv_repeat

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
    if isinstance(m, nn.MultiheadAttention):
        return "attention"
    return "elementwise"


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x:
        return _first_tensor(x[0])
    return None


# -- per-layer attributes recorded with the shapes (their dims follow pruning too) ---------
Attrs = Callable[[nn.Module, tuple], tuple[int, ...]]
_ATTRS: dict[type, Attrs] = {
    nn.Conv1d: lambda m, inp: (m.in_channels, m.out_channels),
    nn.Conv2d: lambda m, inp: (m.in_channels, m.out_channels),
    nn.Conv3d: lambda m, inp: (m.in_channels, m.out_channels),
}



def _mha_attrs(m: nn.MultiheadAttention, inp: tuple) -> tuple[int, ...]:
    """(qlen, klen, vlen, qdim, kdim, vdim, num_heads) of one call, as the counter reads them."""
    q, k, v = inp[:3]
    seq = 1 if m.batch_first else 0
    return (q.shape[seq], k.shape[seq], v.shape[seq], q.shape[-1], k.shape[-1], v.shape[-1], m.num_heads)


_ATTRS[nn.MultiheadAttention] = _mha_attrs


@_register(nn.MultiheadAttention)
def _multihead_attention(m, dim, in_shape, out_shape) -> list[Term]:
    """torch_pruning's count for ``nn.MultiheadAttention``, term by term: the query scaling,
    the q/k/v projections (as it counts them: ``len * dim * dim`` each) and their bias, per
    head ``QK^T`` (``qlen * klen * head_dim``), the softmax (``qlen * klen``) and ``attention x
    V`` (``qlen * klen * v_head_dim``), then the output projection with its bias. Summed over
    heads, ``QK^T`` is ``qlen * klen * qdim`` since whole heads are pruned (``head_dim *
    num_heads == qdim`` stays true); the softmax keeps ``num_heads`` as a factor."""
    qlen, klen, vlen, qdim, kdim, vdim, heads = (dim("attr", i) for i in range(7))
    terms = [(1.0, (qlen, qdim)), (1.0, (qlen, qdim, qdim)), (1.0, (klen, kdim, kdim)), (1.0, (vlen, vdim, vdim))]
    if m.in_proj_bias is not None:
        terms += [(1.0, (qlen, qdim)), (1.0, (klen, qdim)), (1.0, (vlen, qdim))]
    terms += [(1.0, (qlen, klen, qdim)), (1.0, (heads, qlen, klen)), (1.0, (qlen, klen, vdim))]
    return terms + [(1.0, (qlen, vdim, vdim)), (1.0, (qlen, vdim))]

class _ShapeRecorder:
    """Forward hooks that record per-sample input/output shapes of every counted layer."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.attrs: dict[str, tuple[int, ...]] = {}

    def _hook(self, name: str):
        def hook(mod, inp, out):
            i, o = _first_tensor(inp), _first_tensor(out)
            if i is not None and o is not None:
                self.shapes[name] = (tuple(i.shape[1:]), tuple(o.shape[1:]))
                if type(mod) in _ATTRS:
                    self.attrs[name] = _ATTRS[type(mod)](mod, inp)
        return hook

    def snapshot(self, example_inputs: Any) -> dict[tuple, int]:
        self.shapes, self.attrs = {}, {}
        hooks = [m.register_forward_hook(self._hook(n)) for n, m in self.model.named_modules() if type(m) in _FORMULAS]
        try:
            with torch.no_grad():
                forward(self.model, example_inputs)
        finally:
            for h in hooks:
                h.remove()
        values: dict[tuple, int] = {}
        for name, (ins, outs) in self.shapes.items():
            for kind, shape in (("in", ins), ("out", outs), ("attr", self.attrs.get(name, ()))):
                for i, v in enumerate(shape):
                    values[(name, kind, i)] = v
        for name, (q, _, _) in attention_modules(self.model).items():
            module = self.model.get_submodule(name)
            values[(name, "heads", 0)] = attention_heads(module, self.model.get_submodule(q).out_features)
        for pname, p in self.model.named_parameters():
            for i, v in enumerate(p.shape):
                values[(pname, "param", i)] = v
        return values


def _layer_terms(model: nn.Module, shapes: dict, slopes: np.ndarray, dim: Callable[..., int]) -> tuple[list[Term], list[str]]:
    """FLOPs terms (and their layer kinds) of every counted layer, by its formula."""
    modules = dict(model.named_modules())
    terms: list[Term] = []
    kinds: list[str] = []
    for name, (in_shape, out_shape) in shapes.items():
        m = modules[name]
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups != 1:
            touched = slopes[:, dim(name, "attr", 1)].any()
            if not (m.groups == m.in_channels == m.out_channels) and touched:
                raise ValueError(f"cost model cannot follow grouped conv {name!r} under pruning")
        layer_terms = _FORMULAS[type(m)](m, lambda kind, i, n=name: dim(n, kind, i), in_shape, out_shape)
        terms.extend(layer_terms)
        kinds.extend([layer_kind(m)] * len(layer_terms))
    return terms, kinds


def _product_terms(shapes: dict, dim: Callable[..., int], name: str, qkv: tuple[str, str, str],
                   repeat: int = 1) -> list[Term]:
    """The attention products of an attention module (``spaces.units.attention_modules``),
    counted as torch_pruning counts them for ``nn.MultiheadAttention``: per query head
    ``QK^T`` (``qlen * klen * head_dim``), the softmax (``qlen * klen``) and ``attention x V``
    (``qlen * klen * v_head_dim``). Token counts are the projections' outputs without their
    last (width) dimension; summed over heads, the products are ``qlen * klen * q width`` and
    ``qlen * klen * v width * repeat``, where ``repeat`` is the query heads sharing each value
    head (grouped-query attention; a constant: its key/value heads are never pruned apart)."""
    (q, k, v), out = qkv, {n: shapes[n][1] for n in qkv}
    tokens = {n: tuple(dim(n, "out", i) for i in range(len(out[n]) - 1)) for n in qkv}
    width = {n: dim(n, "out", len(out[n]) - 1) for n in qkv}
    heads = dim(name, "heads", 0)
    return [(1.0, tokens[q] + tokens[k] + (width[q],)), (1.0, (heads,) + tokens[q] + tokens[k]),
            (float(repeat), tokens[q] + tokens[v] + (width[v],))]


@dataclass(frozen=True)
class CostModel:
    """Affine channel dimensions + FLOPs/params formulas over them."""

    group_names: tuple[str, ...]
    group_channels: tuple[int, ...]
    base_dims: np.ndarray          # (D,)
    slopes: np.ndarray             # (G, D): change of each dim per removed unit of group g
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
            prune_group(graph, modules, g, [0])
            snaps.append(recorder.snapshot(example_inputs))
        keys = list(snaps[0])
        index = {k: i for i, k in enumerate(keys)}
        table = np.array([[s.get(k, 0) for k in keys] for s in snaps], dtype=np.float64)
        slopes = table[:-1] - table[1:]

        dim = lambda n, kind, i: index[(n, kind, i)]  # noqa: E731
        terms, kinds = _layer_terms(model, base_shapes, slopes, dim)
        for name, (q, k, v) in attention_modules(model).items():
            if {q, k, v} <= set(base_shapes):
                terms += _product_terms(base_shapes, dim, name, (q, k, v), kv_repeat(model.get_submodule(name)))
                kinds += ["attention"] * 3
        params: list[tuple[int, ...]] = []
        seen: set[int] = set()
        for pname, p in model.named_parameters():
            if id(p) not in seen:
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
    """FLOPs (MACs per sample) and params counted on a real model: torch_pruning's counter,
    plus the attention products of attention modules other than ``nn.MultiheadAttention``,
    which it does not see (functional matmuls; it counts them in ``nn.MultiheadAttention`` only)."""
    import torch_pruning as tp

    flops, params = tp.utils.count_ops_and_params(model, example_inputs)
    return Cost(flops=float(flops) + _count_products(model, example_inputs), params=float(params))


def _count_products(model: nn.Module, example_inputs: Any) -> float:
    """Per-sample FLOPs of the attention products of ``model``'s ``attention_modules``
    (``_product_terms`` says how they are counted), from one forward pass."""
    attention = attention_modules(model)
    outputs: dict[str, torch.Tensor] = {}
    projections = [(n, model.get_submodule(n)) for qkv in attention.values() for n in qkv]
    forward_with_hooks(model, example_inputs, projections, outputs.__setitem__)
    total = 0.0
    for name, (q, k, v) in attention.items():
        if not {q, k, v} <= set(outputs):
            continue
        tokens = {n: math.prod(outputs[n].shape[1:-1]) for n in (q, k, v)}
        module = model.get_submodule(name)
        heads, repeat = attention_heads(module, outputs[q].shape[-1]), kv_repeat(module)
        total += tokens[q] * tokens[k] * (outputs[q].shape[-1] + heads) + tokens[q] * tokens[v] * outputs[v].shape[-1] * repeat
    return total
