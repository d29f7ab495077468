"""Small attention and GroupNorm models for the head-group and GroupNorm tests.

``MHAViT``: a pre-norm transformer on patch tokens with ``nn.MultiheadAttention`` and a
residual stream (``batch_first`` either way). ``QKVViT``: the same with a hand-written
q/k/v/out attention module. ``GroupNormNet``: convs followed by ``GroupNorm`` of different
group sizes, one on a residual add.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

# hand-written multi-head self-attention (q/k/v/out projections, ``num_heads``): the built-in
# tokens task's module
from evaluators.tokens import Attention

TOKENS, PATCH = 16, 12


def tokens_input() -> torch.Tensor:
    return torch.randn(1, TOKENS, PATCH)


def image_input() -> torch.Tensor:
    return torch.randn(1, 3, 16, 16)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, hand_written: bool, batch_first: bool = True):
        super().__init__()
        self.hand_written, self.batch_first = hand_written, batch_first
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, 8) if hand_written else nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.hand_written:
            x = x + self.attn(h)
        elif self.batch_first:
            x = x + self.attn(h, h, h, need_weights=False)[0]
        else:
            t = h.transpose(0, 1)
            x = x + self.attn(t, t, t, need_weights=False)[0].transpose(0, 1)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class MHAViT(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64, depth: int = 2, num_classes: int = 10,
                 hand_written: bool = False, batch_first: bool = True):
        super().__init__()
        self.embed = nn.Linear(PATCH, dim)
        self.pos = nn.Parameter(torch.zeros(1, TOKENS, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden, hand_written, batch_first) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed(x) + self.pos)
        return self.head(self.norm(x).mean(dim=1))


class QKVViT(MHAViT):
    """Hand-written attention with 4, then 6 heads of 8 (so its q/k/v width is not the stream's)."""

    def __init__(self, dim: int = 32, hidden: int = 64, num_classes: int = 10):
        super().__init__(dim=dim, hidden=hidden, depth=0, num_classes=num_classes)
        self.blocks = nn.Sequential(Block(dim, 4, hidden, True), Block(dim, 6, hidden, True))


class GroupNormNet(nn.Module):
    """GroupNorm(4, 16) after conv1; GroupNorm(8, 32) and GroupNorm(4, 32) on one residual stream."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.conv2, self.gn2 = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32)
        self.conv3, self.gn3 = nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(4, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.gn1(self.conv1(x)))
        x = torch.relu(self.gn2(self.conv2(x)))
        x = x + torch.relu(self.gn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_attention_task(seed: int = 0, samples: int = 32, heads: int = 2):
    """A task plugin over an untrained ``MHAViT`` (``heads`` heads of ``32 // heads``) on
    random tokens (``[task] name = "tests.attention_models:tiny_attention_task"``). With two
    heads, the tiny study's ``ratio_min = 0.2`` would keep no head."""
    from evaluators.tasks import Task

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    build = functools.partial(MHAViT, heads=heads)
    model = build()
    x = torch.randn(3 * samples, TOKENS, PATCH, generator=gen)
    y = torch.randint(0, 10, (3 * samples,), generator=gen)
    return Task(
        name="tiny-attention", build_model=build,
        train=(x[:samples], y[:samples]), calibration=(x[samples:2 * samples], y[samples:2 * samples]),
        validation=(x[2 * samples:], y[2 * samples:]), example_inputs=x[:1].clone(), num_classes=10,
        base_state={k: v.clone() for k, v in model.state_dict().items()}, config={"seed": seed, "samples": samples, "heads": heads},
    )


class CrossAttention(nn.Module):
    """``nn.MultiheadAttention`` attending from one projection of the input to another
    (``kdim``/``vdim`` different from ``embed_dim`` with ``kv_dim``), then an MLP."""

    def __init__(self, bias: bool = True, add_bias_kv: bool = False, kv_dim: int | None = None):
        super().__init__()
        self.query, self.memory = nn.Linear(PATCH, 32), nn.Linear(PATCH, kv_dim or 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True, bias=bias, add_bias_kv=add_bias_kv,
                                          kdim=kv_dim, vdim=kv_dim)
        self.mid, self.head = nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.memory(x)
        return self.head(torch.relu(self.mid(self.attn(self.query(x), m, m, need_weights=False)[0])).mean(dim=1))
