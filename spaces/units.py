"""Channel groups pruned in whole blocks: attention heads and GroupNorm groups.

Some layers stay valid only if the channels they see are removed in whole blocks: a
``GroupNorm(g, C)`` normalises contiguous blocks of ``C / g`` channels, an attention layer
splits its q/k/v width into ``num_heads`` contiguous heads. A *block rule* finds, for one
module of a channel group, the attribute that counts such blocks and the block size; the
group is then pruned in units of the least common multiple of its blocks' sizes, and after
pruning every such attribute is set to ``kept width // block size``.

Rules (one function, one registration in ``BLOCK_RULES``):

* ``nn.GroupNorm``: ``num_groups``, blocks of ``num_channels // num_groups``. Whole
  normalisation groups are removed, so every kept channel is normalised with the channels
  it was normalised with before.
* ``nn.MultiheadAttention``: ``num_heads``, blocks of ``head_dim``. Its ``embed_dim`` is its
  input, q/k/v and output width at once, so on a residual stream its heads *are* the
  stream's width: the stream is one group, pruned in whole heads, and every
  ``nn.MultiheadAttention`` on it keeps the same heads.
* A hand-written attention module (an integer ``num_heads`` attribute and ``nn.Linear``
  children named as in ``QKV_TRIPLES``): ``num_heads``, blocks of ``out_features //
  num_heads`` of the q/k/v projection in the group. Its q/k/v/out projections form their
  own group (torch_pruning couples them through the attention products), independent of
  the residual stream, so each such layer's kept heads are a group of their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch.nn as nn

# q/k/v child names of a hand-written attention module, one naming scheme per entry.
QKV_TRIPLES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"))
QKV_NAMES = frozenset(n for triple in QKV_TRIPLES for n in triple)
HEAD_ATTR = "num_heads"


@dataclass(frozen=True)
class BlockCount:
    """``module.attr`` counts blocks of ``size`` channels of a group."""

    module: str
    attr: str
    size: int


# A rule gets (name of a module touched by the group, that module, whether the group prunes
# its output channels, the model's modules by name) and returns the BlockCount it implies,
# or None.
BlockRule = Callable[[str, nn.Module, bool, dict[str, nn.Module]], "BlockCount | None"]
BLOCK_RULES: dict[str, BlockRule] = {}


def block_rule(name: str) -> Callable[[BlockRule], BlockRule]:
    def wrap(fn: BlockRule) -> BlockRule:
        BLOCK_RULES[name] = fn
        return fn
    return wrap


@block_rule("group_norm")
def _group_norm(name: str, module: nn.Module, out: bool, modules: dict[str, nn.Module]) -> BlockCount | None:
    if not isinstance(module, nn.GroupNorm) or module.num_groups == 1:
        return None
    return BlockCount(name, "num_groups", module.num_channels // module.num_groups)


@block_rule("multihead_attention")
def _multihead_attention(name: str, module: nn.Module, out: bool, modules: dict[str, nn.Module]) -> BlockCount | None:
    if not isinstance(module, nn.MultiheadAttention):
        return None
    return BlockCount(name, HEAD_ATTR, module.embed_dim // module.num_heads)


@block_rule("qkv_attention")
def _qkv_attention(name: str, module: nn.Module, out: bool, modules: dict[str, nn.Module]) -> BlockCount | None:
    parent_name, _, child = name.rpartition(".")
    parent = modules.get(parent_name) if parent_name else None
    heads = getattr(parent, HEAD_ATTR, None)
    if not out or not isinstance(module, nn.Linear) or child not in QKV_NAMES or isinstance(heads, bool) \
            or not isinstance(heads, int) or heads < 1 or module.out_features % heads:
        return None
    return BlockCount(parent_name, HEAD_ATTR, module.out_features // heads)


def block_counts(touched: Iterable[tuple[str, bool]], modules: dict[str, nn.Module]) -> tuple[BlockCount, ...]:
    """Every block count implied by the modules a group touches, given as (name, whether the
    group prunes its output channels); one per module attribute."""
    found: dict[tuple[str, str], BlockCount] = {}
    for name, out in touched:
        for rule in BLOCK_RULES.values():
            count = rule(name, modules[name], out, modules)
            if count is not None:
                found.setdefault((count.module, count.attr), count)
    return tuple(found[k] for k in sorted(found))


def unit_of(counts: Iterable[BlockCount]) -> int:
    """Channels per pruning unit: the least common multiple of the block sizes (1 if none)."""
    return math.lcm(1, *(c.size for c in counts))


def set_counts(counts: Iterable[BlockCount], modules: dict[str, nn.Module], width: int) -> None:
    """Set every counted attribute for a group ``width`` channels wide."""
    for c in counts:
        setattr(modules[c.module], c.attr, width // c.size)


def counts_match(counts: Iterable[BlockCount], modules: dict[str, nn.Module], width: int) -> bool:
    """Whether every counted attribute says ``width // size`` (and ``size`` divides ``width``)."""
    return all(width % c.size == 0 and getattr(modules[c.module], c.attr) == width // c.size for c in counts)


def unit_channels(units: Iterable[int], unit: int) -> list[int]:
    """Channel indices of the pruning units ``units`` (contiguous blocks of ``unit``)."""
    return [u * unit + j for u in sorted(units) for j in range(unit)]


def attention_modules(model: nn.Module) -> dict[str, tuple[str, str, str]]:
    """Hand-written attention modules of ``model`` (an integer ``num_heads`` and ``nn.Linear``
    q/k/v children): name -> the qualified names of its q, k and v projections."""
    found: dict[str, tuple[str, str, str]] = {}
    for name, module in model.named_modules():
        heads = getattr(module, HEAD_ATTR, None)
        if isinstance(module, nn.MultiheadAttention) or isinstance(heads, bool) or not isinstance(heads, int):
            continue
        children = dict(module.named_children())
        for triple in QKV_TRIPLES:
            if all(isinstance(children.get(c), nn.Linear) for c in triple):
                found[name] = tuple(f"{name}.{c}" if name else c for c in triple)  # type: ignore[assignment]
                break
    return found
