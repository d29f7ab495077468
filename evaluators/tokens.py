"""The ``tokens`` task: a small transformer classifying procedural token sequences.

Each sequence holds ``length`` tokens from a vocabulary of ``vocab``: filler tokens, plus
special tokens placed at random positions that decide the label, three independent bits
(8 classes), each needing attention across the sequence:

* **order**: do the markers appear as M1 ... M2 or as M2 ... M1 (relative position);
* **count**: are there more A tokens than B tokens (1-5 of each, never equal);
* **half**: do most of the three C tokens lie in the first or in the second half.

The model (:class:`TokenTransformer`) is a pre-norm encoder: a token embedding plus a
learned position embedding, ``depth`` blocks of hand-written multi-head self-attention
(``q_proj``/``k_proj``/``v_proj``/``out_proj`` and a ``num_heads`` attribute, the layout of
Hugging Face's attention modules) and a GELU MLP, then mean pooling and a linear head.
Pruning finds one group per attention layer (its heads, ``spaces.units``), one per MLP
hidden layer and the residual stream; the base model is trained once with AdamW and cached.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from evaluators.task_training import check_option, check_split, task_options, trained_task
from evaluators.tasks import Task, register_task
from spaces.checks import check_int, check_number

Tensor = torch.Tensor
NUM_CLASSES = 8
M1, M2, A, B, C = range(5)   # special tokens; the others are filler
SPECIAL = 5

_TOKENS_VERSION = 1  # bump when the generator, architecture or training changes
TOKENS_DEFAULTS: dict = {
    "seed": 0,
    "n_samples": 10000,      # 7000 train / 1000 calibration / 2000 validation
    "vocab": 24,
    "length": 24,
    "dim": 64,
    "heads": 4,
    "head_dim": 16,
    "hidden": 128,
    "depth": 3,
    "epochs": 4,
    "batch_size": 64,
    "lr": 0.002,
    "split": [0.7, 0.1, 0.2],
}


# -- data ------------------------------------------------------------------------------------
def _pick(positions: list[int], k: int, gen: torch.Generator) -> list[int]:
    return [positions[i] for i in torch.randperm(len(positions), generator=gen)[:k].tolist()]


def _place_sample(x: Tensor, bits: tuple[int, int, int], gen: torch.Generator) -> None:
    """Write the special tokens of one sample with label ``bits`` into ``x`` (one row)."""
    length = x.numel()
    order, more_a, first_half = bits
    halves = (list(range(length // 2)), list(range(length // 2, length)))
    chosen, other = halves if first_half else halves[::-1]
    in_chosen = int(torch.randint(2, 4, (1,), generator=gen))   # 2 or 3 of the 3 C tokens
    c_positions = _pick(chosen, in_chosen, gen) + _pick(other, 3 - in_chosen, gen)
    for p in c_positions:
        x[p] = C
    rest = _pick([p for p in range(length) if p not in c_positions], length, gen)
    p1, p2 = sorted(rest[:2])
    x[p1], x[p2] = (M1, M2) if order else (M2, M1)
    few, many = sorted((torch.randperm(5, generator=gen)[:2] + 1).tolist())
    count_a, count_b = (many, few) if more_a else (few, many)
    for p in rest[2:2 + count_a]:
        x[p] = A
    for p in rest[2 + count_a:2 + count_a + count_b]:
        x[p] = B


def generate_tokens(n: int, *, seed: int = 0, vocab: int = 24, length: int = 24) -> tuple[Tensor, Tensor]:
    """``n`` sequences ``(x: long [n, length], y: long [n])``, deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(SPECIAL, vocab, (n, length), generator=gen)
    bits = torch.randint(0, 2, (n, 3), generator=gen)
    for i in range(n):
        _place_sample(x[i], tuple(int(b) for b in bits[i]), gen)
    y = bits[:, 0] * 4 + bits[:, 1] * 2 + bits[:, 2]
    return x, y


# -- model -----------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (``num_heads`` heads)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.out_proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(dim=-1)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TokenTransformer(nn.Module):
    def __init__(self, vocab: int = 24, length: int = 24, dim: int = 64, heads: int = 4, head_dim: int = 16,
                 hidden: int = 128, depth: int = 3, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, head_dim, hidden) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.embed(x) + self.pos)
        return self.head(self.norm(h).mean(dim=1))


def build_tokens_model(vocab: int, length: int, dim: int, heads: int, head_dim: int, hidden: int,
                       depth: int) -> nn.Module:
    return TokenTransformer(vocab, length, dim, heads, head_dim, hidden, depth)


# -- task ------------------------------------------------------------------------------------
def tokens_options(options: Mapping) -> dict:
    """``options`` merged over the defaults and validated (one-line ``ValueError`` naming the option)."""
    opts = task_options("tokens", options, TOKENS_DEFAULTS)
    # length 16 holds the specials: 3 C tokens (2 in one half), 2 markers, <= 9 A/B tokens
    minimum = {"seed": 0, "n_samples": NUM_CLASSES, "vocab": SPECIAL + 2, "length": 16, "dim": 4, "heads": 1,
               "head_dim": 1, "hidden": 1, "depth": 1, "epochs": 1, "batch_size": 1}
    for key, low in minimum.items():
        check_option("tokens", key, opts[key], check_int, low, wanted=f"an integer >= {low}")
    return {**opts, "split": check_split("tokens", opts["split"]),
            "lr": check_number("tokens option lr", opts["lr"], positive=True)}


@register_task("tokens")
def tokens_task(options: dict, cache_dir: Path) -> Task:
    """Procedural token sequences (see module docstring) with a small transformer, trained once and cached."""
    opts = tokens_options(options)
    config = {"task": "tokens", "version": _TOKENS_VERSION, **opts}
    x, y = generate_tokens(opts["n_samples"], seed=opts["seed"], vocab=opts["vocab"], length=opts["length"])
    build = functools.partial(build_tokens_model, opts["vocab"], opts["length"], opts["dim"], opts["heads"],
                              opts["head_dim"], opts["hidden"], opts["depth"])
    return trained_task("tokens", x, y, build=build, num_classes=NUM_CLASSES,
                        opts={**opts, "optimizer": "adamw"}, config=config, cache_dir=cache_dir)
