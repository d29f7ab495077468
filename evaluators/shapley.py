"""Shapley-value channel importance by permutation sampling (Ancona et al. 2020; cf. TorchPruner).

The players of the game are the channels of one group; the value of a coalition S is the
calibration loss with every channel *not* in S removed. A channel is "removed" by zeroing
it at the output of every layer that produces the group's coupled tensor (the convs /
linears whose output channels the group prunes, and their BatchNorm/LayerNorm): a
forward hook multiplies each such output by a channel mask. Zeroing the *last* producer
(usually the BN) is what real removal does to the consumers; zeroing a conv whose BN
follows is harmless because the BN output is zeroed too.

Estimator, per group with ``n`` channels::

    for each of `samples` random permutations of the channels (seeded per group):
        start from the full model (loss L_0)
        remove the permutation's channels one by one; the marginal contribution of a
        channel is L(after removing it) - L(before)
    importance = mean marginal contribution (higher = removing it costs more loss)

Without truncation the scores of a group sum exactly to L(all removed) - L(full) (the
efficiency axiom; each walk telescopes). **Truncation** (``truncation=tau``, TMC-Shapley,
Ghorbani & Zou 2019): a walk stops as soon as its loss reaches
``L(all removed) - tau * |L(all removed) - L(full)|``; the channels not yet walked get
a zero marginal in that permutation (their exact remaining total is at most tau of the
full range when the loss is monotone). ``truncation=None`` walks every permutation to
the end.

**Cost** per scored group: ``2 + samples * walked`` forward passes over ``max_samples``
calibration samples (plus one single-sample pass to schedule them), ``walked <= n``
(``n`` without truncation), i.e. about ``samples * n * max_samples * model_flops``
multiply-adds. The passes re-run only what follows the group: every module that finished
before the group's first producer started returns its output recorded once
(:class:`ForwardSchedule`). That is orders of magnitude more than the weight criteria
and Taylor. Scores depend only on (weights, calibration data, loss, options), so they are
cached per group in-process (``cache=True``, LRU): a search pays the cost once per group
and worker. Truncation saves the passes of a walk's tail (losses approach L(all removed)
only late in a walk); larger values save more.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn

from evaluators.batch import Batch, call, concat, sample_count, take
from evaluators.importance import Importance, default_loss, register_importance
from spaces.checks import check_bool, check_int, check_number

log = logging.getLogger(__name__)

_CHANNEL_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class ShapleyConfig:
    """Options of the ``shapley`` criterion (see the module docstring for their cost)."""

    samples: int = 2                   # permutations per group
    truncation: float | None = 0.05    # TMC tolerance, fraction of |L(all removed) - L(full)|; None = full walks
    max_samples: int = 32              # calibration samples in each forward pass
    seed: int = 0
    cache: bool = True                 # reuse a group's scores for identical weights + data + options

    def __post_init__(self) -> None:
        check_int("shapley samples", self.samples, 1)
        if self.truncation is not None:
            check_number("shapley truncation", self.truncation, 0)
        check_int("shapley max_samples", self.max_samples, 1)
        check_int("shapley seed", self.seed, 0)
        check_bool("shapley cache", self.cache)


# -- channel masking -----------------------------------------------------------------------
@dataclass
class _Producer:
    module: nn.Module
    dim: int                   # channel dimension of the module's output
    member_idxs: torch.Tensor  # channels of this module's output ...
    root_idxs: torch.Tensor    # ... and the root channels they belong to


def group_producers(group: Any) -> list[_Producer]:
    """Layers whose output carries the group's channels (out-channel pruning targets)."""
    producers: list[_Producer] = []
    seen: set[int] = set()
    for i, (dep, idxs) in enumerate(group):
        module = dep.target.module
        if not isinstance(module, _CHANNEL_TYPES) or getattr(dep.handler, "__name__", "") != "prune_out_channels":
            continue
        if id(module) in seen:
            continue
        pairs = [(int(m), int(r)) for m, r in zip(idxs, group[i].root_idxs) if r is not None]
        if not pairs:
            continue
        seen.add(id(module))
        dim = -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1
        member, root = zip(*pairs)
        producers.append(_Producer(module, dim, torch.tensor(member), torch.tensor(root)))
    return producers


class ChannelMask:
    """Context manager zeroing root channels of a group via forward hooks.

    ``mask`` (float, one entry per root channel, 1 = kept) may be changed in place between
    forward passes; the hooks read it on every call.
    """

    def __init__(self, group: Any, n_channels: int):
        self.producers = group_producers(group)
        if not self.producers:
            raise ValueError("group has no layer producing its channels (nothing to mask)")
        self.mask = torch.ones(n_channels)
        self._handles: list[Any] = []

    def _hook(self, producer: _Producer) -> Callable:
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                return output
            full = torch.ones(output.shape[producer.dim], dtype=output.dtype, device=output.device)
            full[producer.member_idxs.to(output.device)] = self.mask[producer.root_idxs].to(output.device, output.dtype)
            shape = [1] * output.dim()
            shape[producer.dim] = -1
            return output * full.view(shape)

        return hook

    def __enter__(self) -> "ChannelMask":
        self._handles = [p.module.register_forward_hook(self._hook(p)) for p in self.producers]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class ForwardSchedule:
    """When each module ran during one forward pass: which ones a later pass may skip.

    Data dependencies follow execution order, so a module that finished before a changed
    (masked / refitted) layer started cannot see the change; re-running it is wasted work.
    :meth:`skippable` lists the outermost such modules; :func:`replaying` swaps their
    ``forward`` for their recorded output. Modules called more than once per pass (shared
    activations) or returning non-tensors are never skipped. Also used by
    ``evaluators.compensation``.
    """

    def __init__(self, model: nn.Module, run: Callable[[], Any]):
        self.model = model
        self._events: dict[int, list[int]] = {}
        self._tensor_out: set[int] = set()
        self._parent: dict[int, nn.Module] = {}
        for module in model.modules():
            for child in module.children():
                self._parent.setdefault(id(child), module)
        clock = [0]

        def pre(module, inputs) -> None:  # a pre-hook's return value would replace the inputs
            clock[0] += 1
            self._events.setdefault(id(module), []).append(clock[0])

        def post(module, inputs, output) -> None:
            clock[0] += 1
            self._events[id(module)].append(clock[0])
            if isinstance(output, torch.Tensor):
                self._tensor_out.add(id(module))

        handles = [h for m in model.modules()
                   for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
        try:
            with torch.no_grad():
                run()
        finally:
            for h in handles:
                h.remove()

    def start(self, modules: Sequence[nn.Module]) -> int | None:
        """Clock at which the first of ``modules`` started (None: none of them ran)."""
        starts = [self._events[id(m)][0] for m in modules if id(m) in self._events]
        return min(starts) if starts else None

    def calls(self, module: nn.Module) -> int:
        """How many times ``module`` was called in the recorded pass."""
        return len(self._events.get(id(module), ())) // 2

    def skippable(self, before: int | None) -> list[nn.Module]:
        """Outermost modules called once, with a tensor output, finished before clock ``before``."""
        if before is None:
            return []
        ok = {
            id(m): m for m in self.model.modules()
            if m is not self.model and len(self._events.get(id(m), ())) == 2
            and self._events[id(m)][1] < before and id(m) in self._tensor_out
        }
        return [m for key, m in ok.items() if id(self._parent.get(key)) not in ok]


def record_outputs(modules: Sequence[nn.Module], store: dict[nn.Module, list[torch.Tensor]]) -> list[Any]:
    """Forward hooks appending each module's (detached) output to ``store[module]``; returns handles."""
    def hook(module, inputs, output) -> None:
        store.setdefault(module, []).append(output.detach())

    return [m.register_forward_hook(hook) for m in modules]


class replaying:
    """Context manager: each module in ``outputs`` returns ``outputs[module]()`` instead of computing.

    Outputs are cloned by the callers' getters when later in-place ops (``ReLU(inplace=True)``)
    could modify them.
    """

    def __init__(self, outputs: dict[nn.Module, Callable[[], torch.Tensor]]):
        self._outputs = outputs

    def __enter__(self) -> "replaying":
        for module, get in self._outputs.items():
            module.forward = lambda *a, _get=get, **k: _get()  # instance attribute shadows the class's
        return self

    def __exit__(self, *exc: Any) -> None:
        for module in self._outputs:
            module.__dict__.pop("forward", None)


# -- the criterion ---------------------------------------------------------------------------
def _fingerprint(*tensors_or_named: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for item in tensors_or_named:
        if isinstance(item, torch.Tensor):
            t = item.detach().cpu().contiguous().reshape(-1)
            h.update(f"{tuple(item.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(item).encode())
    return h.hexdigest()


def _flat(inputs: Any) -> list[Any]:
    """``inputs``' tensors in a fixed order (a dict's keys with them), for ``_fingerprint``."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, dict):
        return [item for key in sorted(inputs) for item in (key, inputs[key])]
    return list(inputs)


def _loss_key(loss_fn: Callable | None) -> str | None:
    """A stable identity for ``loss_fn``; None when it has none (closures): no caching then."""
    if loss_fn is None or loss_fn is default_loss:
        return "default"
    qualname = getattr(loss_fn, "__qualname__", None)
    if qualname is None or "<" in qualname:
        return None
    return f"{getattr(loss_fn, '__module__', '')}.{qualname}"


@register_importance("shapley", needs_calibration=True)
class ShapleyImportance(Importance):
    """Permutation-sampling Shapley values of each channel's contribution to the loss.

    Options (``make_importance("shapley", samples=2, truncation=0.05, max_samples=32,
    seed=0, cache=True)``) are described in :class:`ShapleyConfig`; the cost in this
    module's docstring. Statistics of the last ``prepare``/``score`` calls are kept in
    ``forward_passes``, ``seconds`` and ``cache_hits``.
    """

    _cache: ClassVar[OrderedDict] = OrderedDict()  # bounded LRU, filled at run time only
    _CACHE_SIZE: ClassVar[int] = 512

    def __init__(self, **options: Any):
        known = {f.name for f in fields(ShapleyConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown shapley option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        self.config = ShapleyConfig(**options)
        self.forward_passes = 0
        self.seconds = 0.0
        self.cache_hits = 0
        self._model: nn.Module | None = None

    @classmethod
    def clear_cache(cls) -> None:
        cls._cache.clear()

    def prepare(self, model: nn.Module, calibration: Sequence[Batch] | None, loss_fn: Callable | None = None) -> None:
        if not calibration:
            raise ValueError("shapley importance needs calibration batches; none were given")
        xs, ys, taken = [], [], 0
        for x, y in calibration:
            if taken >= self.config.max_samples:
                break
            k = min(sample_count(x), self.config.max_samples - taken)
            xs.append(take(x, slice(0, k)))
            ys.append(y[:k])
            taken += k
        self._x, self._y = concat(xs), torch.cat(ys)
        self._model = model
        self._loss_fn = loss_fn or default_loss
        self._names = {m: n for n, m in model.named_modules()}
        self._key = None
        loss_key = _loss_key(loss_fn)
        if self.config.cache and loss_key is not None:
            state = [t for kv in sorted(model.state_dict().items()) for t in kv]
            self._key = (_fingerprint(*state), _fingerprint(*_flat(self._x), self._y), loss_key, astuple(self.config))

    def _loss(self) -> float:
        self.forward_passes += 1
        return float(self._loss_fn(call(self._model, self._x), self._y))

    def score(self, group: Any) -> torch.Tensor:
        if self._model is None:
            raise ValueError("shapley importance: prepare() must be called before score()")
        root = group[0].dep.target.module
        n = len(group[0].idxs)
        name = self._names.get(root)
        if name is None:
            raise ValueError("shapley importance: the group belongs to another model than the one given to prepare()")
        key = None if self._key is None else (*self._key, name, n)
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return self._cache[key].clone()
        start = time.perf_counter()
        was_training = self._model.training
        self._model.eval()
        try:
            with torch.no_grad(), ChannelMask(group, n) as masker:
                x1 = take(self._x, slice(0, 1))
                schedule = ForwardSchedule(self._model, lambda: call(self._model, x1))
                skip = schedule.skippable(schedule.start([p.module for p in masker.producers]))
                store: dict[nn.Module, list[torch.Tensor]] = {}
                handles = record_outputs(skip, store)
                try:
                    full = self._loss()  # mask is all ones: the unmasked loss
                finally:
                    for h in handles:
                        h.remove()
                with replaying({m: (lambda t=store[m][0]: t.clone()) for m in skip if m in store}):
                    scores = self._walk(masker, n, name, full)
        finally:
            self._model.train(was_training)
        self.seconds += time.perf_counter() - start
        log.debug("shapley %s: %d channels in %.2f s (%d forward passes so far)", name, n,
                  time.perf_counter() - start, self.forward_passes)
        if key is not None:
            self._cache[key] = scores.clone()
            while len(self._cache) > self._CACHE_SIZE:
                self._cache.popitem(last=False)
        return scores

    def _walk(self, masker: ChannelMask, n: int, name: str, full: float) -> torch.Tensor:
        cfg = self.config
        mask = masker.mask
        mask.fill_(0.0)
        empty = self._loss()
        stop_at = math.inf
        if cfg.truncation is not None and empty > full:
            stop_at = empty - cfg.truncation * (empty - full)
        # Seeded per group so a group's scores do not depend on which other groups are scored.
        rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])
        total = np.zeros(n)
        for _ in range(cfg.samples):
            mask.fill_(1.0)
            prev = full
            for channel in rng.permutation(n):
                mask[channel] = 0.0
                cur = self._loss()
                total[channel] += cur - prev
                prev = cur
                if cur >= stop_at:
                    break
        return torch.from_numpy(total / cfg.samples).float()
