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
* An attention module with ``nn.Linear`` q/k/v children named as in ``QKV_TRIPLES`` and an
  integer head count in one of ``HEAD_ATTRS`` (hand-written: ``num_heads``; Hugging Face ViT
  and BERT: ``num_attention_heads``): that count, blocks of the head size (``head_dim`` or
  ``attention_head_size`` when the module keeps one, else ``out_features // heads``) of the
  q/k/v projection in the group. Its q/k/v/out projections form their own group
  (torch_pruning couples them through the attention products), independent of the residual
  stream, so each such layer's kept heads are a group of their own. Only when q, k and v
  are equally wide: a grouped-query layer's k/v heads are not its query heads.
* The same module's q/k/v width attribute (BERT's ``all_head_size``): blocks of 1 channel,
  so it is set to the kept width.

Attention modules that rotate q and k (a ``position_embeddings`` argument: Hugging Face Llama
and its kin) are never searched from by torch_pruning (``untraceable_roots``): its dependency
search through the rotation's slice-and-concatenate never ends. Their heads are laid out here
instead (``head_layouts``): a group per layer whose unit is one key/value head with the query
heads sharing it (grouped-query attention stays valid: ``num_key_value_groups`` is unchanged).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch.nn as nn

# q/k/v child names of a hand-written attention module, one naming scheme per entry.
QKV_TRIPLES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"))
QKV_NAMES = frozenset(n for triple in QKV_TRIPLES for n in triple)
HEAD_ATTR = "num_heads"
# Attributes counting an attention module's heads, and holding its per-head width.
HEAD_ATTRS = (HEAD_ATTR, "num_attention_heads")
HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size")
WIDTH_ATTR = "all_head_size"  # Hugging Face BERT: q/k/v width (heads * head size)


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


def _int_attr(module: nn.Module | None, names: Iterable[str]) -> tuple[str, int] | None:
    """The first of ``names`` that ``module`` holds as a positive int (not a bool)."""
    for attr in names:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return attr, value
    return None


def head_size(module: nn.Module, q_width: int) -> int | None:
    """Channels per head of an attention module whose q projection is ``q_width`` wide."""
    size = _int_attr(module, HEAD_SIZE_ATTRS)
    if size is not None:
        return size[1]
    heads = _int_attr(module, HEAD_ATTRS)
    return q_width // heads[1] if heads is not None and q_width % heads[1] == 0 else None


def _qkv_parent(name: str, module: nn.Module, out: bool, modules: dict[str, nn.Module]) -> tuple[str, nn.Module] | None:
    """(name, module) of the attention module whose q/k/v projection ``name`` is, when the
    group prunes its outputs and q, k and v are equally wide (no grouped-query attention)."""
    parent_name, _, child = name.rpartition(".")
    if not out or not isinstance(module, nn.Linear) or child not in QKV_NAMES or not parent_name:
        return None
    parent = modules.get(parent_name)
    triple = next((t for t in QKV_TRIPLES if child in t), ())
    widths = {getattr(getattr(parent, c, None), "out_features", None) for c in triple}
    return (parent_name, parent) if widths == {module.out_features} else None


@block_rule("qkv_attention")
def _qkv_attention(name: str, module: nn.Module, out: bool, modules: dict[str, nn.Module]) -> BlockCount | None:
    found = _qkv_parent(name, module, out, modules)
    heads = _int_attr(found[1], HEAD_ATTRS) if found else None
    if heads is None:
        return None
    size = head_size(found[1], module.out_features)
    if not size or module.out_features != heads[1] * size:
        return None
    return BlockCount(found[0], heads[0], size)


@block_rule("qkv_width")
def _qkv_width(name: str, module: nn.Module, out: bool, modules: dict[str, nn.Module]) -> BlockCount | None:
    found = _qkv_parent(name, module, out, modules)
    if found is None or _int_attr(found[1], HEAD_ATTRS) is None or getattr(found[1], WIDTH_ATTR, None) != module.out_features:
        return None
    return BlockCount(found[0], WIDTH_ATTR, 1)


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


def _qkv_children(module: nn.Module) -> tuple[str, str, str] | None:
    children = dict(module.named_children())
    return next((t for t in QKV_TRIPLES if all(isinstance(children.get(c), nn.Linear) for c in t)), None)


def attention_modules(model: nn.Module) -> dict[str, tuple[str, str, str]]:
    """Attention modules of ``model`` other than ``nn.MultiheadAttention``: ``nn.Linear`` q/k/v
    children and an integer head count (``HEAD_ATTRS``) or head size (``HEAD_SIZE_ATTRS``);
    name -> the qualified names of its q, k and v projections."""
    found: dict[str, tuple[str, str, str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) or (
                _int_attr(module, HEAD_ATTRS) is None and _int_attr(module, HEAD_SIZE_ATTRS) is None):
            continue
        triple = _qkv_children(module)
        if triple is not None:
            found[name] = tuple(f"{name}.{c}" if name else c for c in triple)  # type: ignore[assignment]
    return found


def attention_heads(module: nn.Module, q_width: int) -> int:
    """Query heads of an attention module whose q projection is ``q_width`` wide."""
    heads = _int_attr(module, HEAD_ATTRS)
    return heads[1] if heads is not None else q_width // (head_size(module, q_width) or q_width)


def kv_repeat(module: nn.Module) -> int:
    """Query heads per key/value head (Hugging Face ``num_key_value_groups``; 1 without
    grouped-query attention): how often each value head is used by ``attention x V``."""
    found = _int_attr(module, ("num_key_value_groups",))
    return found[1] if found is not None else 1


def _rotary(module: nn.Module) -> bool:
    """Whether ``module``'s forward rotates q and k (takes ``position_embeddings``)."""
    try:
        return "position_embeddings" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def untraceable_roots(model: nn.Module) -> dict[str, str]:
    """q/k/v projections whose output groups torch_pruning cannot search, with the reason:
    those of attention modules that rotate q and k by position embeddings (their forward
    takes ``position_embeddings``: Hugging Face Llama, Mistral, Qwen2 ...); torch_pruning's
    dependency search through the rotation's slice-and-concatenate never ends. Their heads
    are grouped by ``head_layouts`` instead, or left out."""
    found: dict[str, str] = {}
    for name, qkv in attention_modules(model).items():
        if _rotary(model.get_submodule(name)):
            found.update({n: f"q/k of {name!r} are rotated by position embeddings, which torch_pruning's "
                             "dependency search cannot follow" for n in qkv})
    return found


@dataclass(frozen=True)
class HeadLayout:
    """Heads of an attention module laid out by hand: ``kv_heads`` key/value heads of
    ``head_dim`` channels in ``k``/``v``, each shared by ``repeat`` consecutive query heads in
    ``q`` (and the matching input columns of ``o``). A pruning unit is one key/value head with
    its query heads: ``repeat * head_dim`` channels of ``q``."""

    attention: str
    q: str
    k: str
    v: str
    o: str
    head_dim: int
    repeat: int

    def kv_channels(self, q_channels: Iterable[int]) -> list[tuple[int, int]]:
        """(k/v channel, the q channel it is scored with) for the q channels given: one per
        channel of the first query head of each key/value head."""
        unit = self.repeat * self.head_dim
        return [(c // unit * self.head_dim + c % unit, c) for c in q_channels if c % unit < self.head_dim]


def head_layouts(model: nn.Module) -> dict[str, HeadLayout]:
    """q projection name -> ``HeadLayout`` of every rotary attention module (``untraceable_roots``)
    with an ``o_proj``/``out_proj`` linear, an integer ``head_dim`` and equally wide k and v
    holding whole heads that evenly share q's heads (``num_key_value_groups`` query heads each)."""
    found: dict[str, HeadLayout] = {}
    for name, (q, k, v) in attention_modules(model).items():
        module = model.get_submodule(name)
        children = dict(module.named_children())
        o = next((c for c in ("o_proj", "out_proj") if isinstance(children.get(c), nn.Linear)), None)
        size = _int_attr(module, ("head_dim",))
        if not _rotary(module) or o is None or size is None:
            continue
        qw, kw, vw = (model.get_submodule(n).out_features for n in (q, k, v))
        repeat = kv_repeat(module)
        if kw == vw and kw % size[1] == 0 and qw == kw * repeat:
            found[q] = HeadLayout(name, q, k, v, f"{name}.{o}", size[1], repeat)
    return found
