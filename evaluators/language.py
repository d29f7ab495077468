"""The ``markov-lm`` task: a worked example of a language model on dict inputs, scored by perplexity.

Sequences come from a seeded first-order Markov chain over ``vocab - 1`` tokens (token 0
is padding): each token has ``branching`` likely successors (Dirichlet weights) and a
small chance of any other, so the best achievable perplexity is the chain's, well below
the vocabulary's. Each sequence has a random length between ``length // 2`` and
``length`` and is right-padded; a batch's inputs are a dict, ``input_ids`` and
``attention_mask`` (1 for real tokens), as Hugging Face models take them, and its targets
the next token at every position (-100 where there is none: padding, the last token).

The model (:class:`MarkovLM`) is a small causal pre-norm transformer with hand-written
multi-head attention (``q_proj``/``k_proj``/``v_proj``/``out_proj``, ``num_heads``: its
heads are pruned whole) that masks future and padded keys; it returns next-token logits
(batch, tokens, vocab). The task scores by ``perplexity`` (exp of the mean next-token
negative log-likelihood over real targets; minimised), trains (fine-tune, gradient-based
criteria) with the same cross-entropy, and distils with the default KD over the last axis.
A study names it as any objective: ``objectives = ["perplexity", "flops"]``,
``[constraints] max_perplexity = 6``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluators.batch import Batch, call
from evaluators.metrics import MINIMIZE
from evaluators.task_training import check_option, check_split, task_options, trained_task
from evaluators.tokens import Attention
from evaluators.tasks import Task, register_task
from spaces.checks import check_int, check_number

Tensor = torch.Tensor
PAD, IGNORE = 0, -100
LM_METRICS = {"perplexity": MINIMIZE}

_LM_VERSION = 1  # bump when the generator, architecture or training changes
LM_DEFAULTS: dict = {
    "seed": 0,
    "n_samples": 3000,      # 2100 train / 300 calibration / 600 validation
    "vocab": 16,
    "length": 16,
    "branching": 3,
    "dim": 32,
    "heads": 4,
    "hidden": 64,
    "depth": 2,
    "epochs": 4,
    "batch_size": 32,
    "lr": 0.003,
    "split": [0.7, 0.1, 0.2],
}


# -- data ------------------------------------------------------------------------------------
def transition_matrix(vocab: int, branching: int, gen: torch.Generator) -> Tensor:
    """Row-stochastic [vocab-1, vocab-1] matrix: ``branching`` likely successors per token."""
    n = vocab - 1
    probs = torch.full((n, n), 0.02 / n)
    for row in range(n):
        successors = torch.randperm(n, generator=gen)[:branching]
        weights = -torch.log(torch.rand(branching, generator=gen).clamp_min(1e-12))  # Dirichlet(1) once normalised
        probs[row, successors] += 0.98 * weights / weights.sum()
    return probs / probs.sum(dim=1, keepdim=True)


def generate_sequences(n: int, *, seed: int = 0, vocab: int = 16, length: int = 16,
                       branching: int = 3) -> tuple[dict[str, Tensor], Tensor]:
    """``n`` padded sequences as ``({"input_ids", "attention_mask"}, next-token targets)``."""
    gen = torch.Generator().manual_seed(seed)
    probs = transition_matrix(vocab, branching, gen)
    ids = torch.full((n, length), PAD, dtype=torch.long)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
    state = torch.randint(0, vocab - 1, (n,), generator=gen)
    for t in range(length):
        ids[:, t] = torch.where(t < lengths, state + 1, PAD)
        state = torch.multinomial(probs[state], 1, generator=gen).squeeze(1)
    mask = (ids != PAD).long()
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], IGNORE)
    return {"input_ids": ids, "attention_mask": mask}, targets


# -- model -----------------------------------------------------------------------------------
class CausalAttention(Attention):
    """The tokens task's q/k/v/out attention (``num_heads`` heads) over past, non-padded tokens."""

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).masked_fill(~allowed, float("-inf"))
        return self.out_proj((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class LMBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalAttention(dim, heads, dim // heads)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), allowed)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class MarkovLM(nn.Module):
    """``model(input_ids=..., attention_mask=...)`` -> next-token logits (batch, tokens, vocab)."""

    def __init__(self, vocab: int = 16, length: int = 16, dim: int = 32, heads: int = 4, hidden: int = 64,
                 depth: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.blocks = nn.ModuleList(LMBlock(dim, heads, hidden) for _ in range(depth))
        self.norm, self.lm_head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        n = input_ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
        # the first token is never padding, so every query (a padded one too) sees a key
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
        h = self.embed(input_ids) + self.pos[:, :n]
        for block in self.blocks:
            h = block(h, allowed)
        return self.lm_head(self.norm(h))


def build_lm(vocab: int, length: int, dim: int, heads: int, hidden: int, depth: int) -> nn.Module:
    return MarkovLM(vocab, length, dim, heads, hidden, depth)


# -- scoring (module-level: workers unpickle them with the task) ------------------------------
def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the real targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


def lm_metrics(model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    """``perplexity``: exp of the mean negative log-likelihood of every real next token."""
    nll, count = 0.0, 0
    for inputs, targets in batches:
        logits = call(model, inputs)
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     ignore_index=IGNORE, reduction="sum"))
        count += int((targets != IGNORE).sum())
    return {"perplexity": math.exp(min(nll / max(count, 1), 700.0))}  # exp(700) stays a finite float


# -- task ------------------------------------------------------------------------------------
def lm_options(options: Mapping) -> dict:
    """``options`` merged over the defaults and validated (one-line ``ValueError`` naming the option)."""
    opts = task_options("markov-lm", options, LM_DEFAULTS)
    minimum = {"seed": 0, "n_samples": 10, "vocab": 3, "length": 4, "branching": 1, "dim": 2, "heads": 1,
               "hidden": 1, "depth": 1, "epochs": 1, "batch_size": 1}
    for key, low in minimum.items():
        check_option("markov-lm", key, opts[key], check_int, low, wanted=f"an integer >= {low}")
    if opts["dim"] % opts["heads"]:
        raise ValueError(f"markov-lm option heads must divide dim {opts['dim']}, got {opts['heads']}")
    if opts["branching"] > opts["vocab"] - 1:
        raise ValueError(f"markov-lm option branching must be <= vocab - 1 = {opts['vocab'] - 1}, "
                         f"got {opts['branching']}")
    return {**opts, "split": check_split("markov-lm", opts["split"]),
            "lr": check_number("markov-lm option lr", opts["lr"], positive=True)}


@register_task("markov-lm", metrics=LM_METRICS)
def markov_lm_task(options: dict, cache_dir: Path) -> Task:
    """Markov-chain token sequences with a small causal transformer (see module docstring), trained once and cached."""
    opts = lm_options(options)
    config = {"task": "markov-lm", "version": _LM_VERSION, **opts}
    x, y = generate_sequences(opts["n_samples"], seed=opts["seed"], vocab=opts["vocab"], length=opts["length"],
                              branching=opts["branching"])
    build = functools.partial(build_lm, opts["vocab"], opts["length"], opts["dim"], opts["heads"], opts["hidden"],
                              opts["depth"])
    return trained_task("markov-lm", x, y, build=build, num_classes=opts["vocab"],
                        opts={**opts, "optimizer": "adamw"}, config=config, cache_dir=cache_dir,
                        metrics=lm_metrics, metric_directions=dict(LM_METRICS), loss=lm_loss)
