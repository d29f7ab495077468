"""CaP-style compensation: least-squares repair of the layers that lost input channels.

After Xie et al. 2021 (compensation-aware pruning) and the reconstruction step of He et al.
2017 / ThiNet: for every Conv2d or Linear *consumer* whose input channels were removed,
take its inputs on calibration data in the *pruned* model (X) and the output of the
same-named layer of the *unpruned* model (Y, restricted to the output channels the
consumer kept), and replace its weights by the ridge least-squares solution::

    W' = argmin ||X W' - Y||^2 + lambda ||W'||^2,   lambda = ridge * mean(diag(X^T X))

(closed form ``(X^T X + lambda I)^-1 X^T Y``; the bias, when the layer has one, is fitted
as an unpenalised extra column of ones). A conv is linear in its im2col patches, so X
holds ``F.unfold`` rows; ``max_rows`` output positions per layer are sampled (seeded)
because all of them would cost ``N*H*W x (C*k*k)^2`` per layer. Layers are repaired in
execution order and each one's X is re-collected after the layers before it were
repaired (``sequential=True``), so later layers also correct what earlier fits left.

Which rows and columns of the base weights a pruned layer kept is recovered by matching
the pruned weights against the base layer's (pruning copies them exactly); a layer that
cannot be matched, that is not a plain Conv2d/Linear (grouped or depthwise convs read each
removed channel only from outputs removed with it), or whose fit is worse than its
current weights is left unchanged and the reason is logged.

Registered recoveries: ``cap`` runs this and then adaptive BN; ``cap_nobn`` runs it alone
(the refitted layers reproduce the unpruned outputs, so the trained BN statistics stay
valid and are better estimated than from a few calibration batches). Their cost and
accuracy against adaptive BN are measured by ``benchmarks/methods.py``.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluators.batch import Batch, call, take
from evaluators.compensation_layers import conv_padding, in_width, kept_indices, unsupported
from evaluators.recover import recover, register_recovery
from spaces.checks import check_bool, check_int, check_number
from evaluators.shapley import ForwardSchedule, record_outputs, replaying

log = logging.getLogger(__name__)

_REPLAY_BYTES = 512 * 2**20  # activations kept between passes, at most

# (name, pruned layer, base layer, kept base output rows, kept base input columns)
_Layer = tuple[str, nn.Module, nn.Module, list[int], list[int]]


@dataclass(frozen=True)
class CaPConfig:
    """Options of the least-squares compensation."""

    ridge: float = 1e-3          # relative ridge term (fraction of the mean diagonal of X^T X)
    max_rows: int = 4096         # sampled output positions per layer (over all batches)
    sequential: bool = True      # re-collect X after compensating the layers before
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("cap ridge", self.ridge, 0)
        check_int("cap max_rows", self.max_rows, 1)
        check_bool("cap sequential", self.sequential)
        check_int("cap seed", self.seed, 0)


@dataclass
class LayerReport:
    """What compensation did to one consumer layer."""

    name: str
    kind: str
    in_base: int
    in_pruned: int
    error_before: float | None = None  # ||X W - Y||^2 / ||Y||^2 on the sampled rows
    error_after: float | None = None
    skipped: str | None = None


@dataclass
class CompensationReport:
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def compensated(self) -> list[str]:
        return [r.name for r in self.layers if r.skipped is None]

    @property
    def skipped(self) -> dict[str, str]:
        return {r.name: r.skipped for r in self.layers if r.skipped is not None}


# -- data collection -------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a hook once it captured what it needs (skips the rest of the forward)."""


def _input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One row per output position: im2col patches (conv, ``(C, kh, kw)`` order = weight
    layout) or feature rows (linear)."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=conv_padding(module),
                        stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _output_rows(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    try:
        call(model, x)
    except _Stop:
        pass


@dataclass
class _Normal:
    """Accumulated normal equations of one layer's fit."""

    xtx: torch.Tensor
    xty: torch.Tensor
    yty: float = 0.0
    rows: int = 0


# -- the compensation --------------------------------------------------------------------------
def compensate(
    pruned: nn.Module, base: nn.Module, calibration: Sequence[Batch], config: CaPConfig = CaPConfig()
) -> CompensationReport:
    """Refit, in place, every Conv2d/Linear of ``pruned`` that lost input channels.

    ``base`` is the unpruned model with the same qualified module names; it is not
    modified. Raises ``ValueError`` without calibration batches.
    """
    if not calibration:
        raise ValueError(
            "cap compensation needs calibration batches; none were given (calibration_samples must be > 0)"
        )
    start = time.perf_counter()
    report = CompensationReport()
    layers = _consumer_layers(pruned, base, report)
    if layers:
        was_training, base_was_training = pruned.training, base.training
        pruned.eval()
        base.eval()
        try:
            _refit(pruned, base, calibration, layers, report, config)
        finally:
            pruned.train(was_training)
            base.train(base_was_training)
    report.seconds = time.perf_counter() - start
    log.debug("cap: compensated %d layer(s) in %.3f s", len(report.compensated), report.seconds)
    return report


def _skip(entry: LayerReport, reason: str) -> None:
    entry.skipped = reason
    log.info("cap: layer %r not compensated: %s", entry.name, reason)


def _consumer_layers(pruned: nn.Module, base: nn.Module, report: CompensationReport) -> list[_Layer]:
    """Every layer of ``pruned`` narrower in its inputs than its base layer (each one gets a
    ``report`` entry) that can be refitted, with the base rows and columns it kept."""
    base_modules = dict(base.named_modules())
    layers: list[_Layer] = []
    for name, module in pruned.named_modules():
        ref = base_modules.get(name)
        if ref is None or type(ref) is not type(module):
            continue
        width, ref_width = in_width(module), in_width(ref)
        if width is None or ref_width is None or width >= ref_width:
            continue
        entry = LayerReport(name, type(module).__name__, ref_width, width)
        report.layers.append(entry)
        reason = unsupported(module)
        kept = kept_indices(module.weight, ref.weight) if reason is None else None
        if reason is None and kept is None:
            reason = "its weights do not match a slice of the base layer's (modified after pruning?)"
        if reason is not None:
            _skip(entry, reason)
        else:
            layers.append((name, module, ref, *kept))
    return layers


def _refit(pruned, base, calibration, layers: list[_Layer], report: CompensationReport, config: CaPConfig) -> None:
    """Fit every layer in execution order (models in eval mode); see the module docstring."""
    x1 = take(calibration[0][0], slice(0, 1))
    schedule = ForwardSchedule(pruned, lambda: call(pruned, x1))
    entries = {r.name: r for r in report.layers}
    for layer in list(layers):
        if schedule.calls(layer[1]) > 1:
            _skip(entries[layer[0]], "called more than once per forward (shared weights)")
            layers.remove(layer)
    layers.sort(key=lambda item: schedule.start([item[1]]) or math.inf)
    targets, picks = _base_targets(base, calibration, layers, config)
    if not config.sequential:
        normals, _ = _collect(pruned, calibration, layers, targets, picks, {}, [])
        for layer in layers:
            _fit(layer, normals.get(layer[0]), entries[layer[0]], config)
        return
    replay: dict[nn.Module, list[torch.Tensor]] = {}
    for layer in layers:
        # Outputs of modules that finished before this layer started stay valid after
        # it is refitted: the next pass replays them instead of recomputing.
        record = schedule.skippable(schedule.start([layer[1]]))
        normals, replay = _collect(pruned, calibration, [layer], targets, picks, replay, record)
        _fit(layer, normals.get(layer[0]), entries[layer[0]], config)


def _base_targets(base, calibration, layers, config):
    """Output rows of every base layer (kept output channels only) on a sample subset per batch.

    Whole samples are drawn (all their output positions), ``max_rows`` rows in all: cheaper
    than gathering scattered im2col patches and still spread over the batches.
    """
    per_batch = max(1, math.ceil(config.max_rows / len(calibration)))
    targets: dict[str, list[torch.Tensor]] = {name: [] for name, *_ in layers}
    picks: dict[str, list[torch.Tensor]] = {name: [] for name, *_ in layers}
    gen = torch.Generator().manual_seed(config.seed)
    handles = []
    for name, _, ref, rows, _ in layers:
        def hook(mod, inputs, output, name=name, rows=rows):
            positions = max(1, output[0].numel() // output.shape[1 if isinstance(mod, nn.Conv2d) else -1])
            take = min(len(output), math.ceil(per_batch / positions))
            idx = torch.randperm(len(output), generator=gen)[:take].sort().values.to(output.device)
            picks[name].append(idx)
            targets[name].append(_output_rows(mod, output[idx])[:, rows].float())
        handles.append(ref.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for x, _ in calibration:
                call(base, x)
    finally:
        for h in handles:
            h.remove()
    return targets, picks


def _collect(pruned, calibration, layers, targets, picks, replay, record):
    """Normal equations of ``layers`` from the pruned model's current inputs.

    ``replay``: per-batch outputs to reuse for modules that cannot have changed; ``record``:
    modules whose per-batch outputs to keep for the next pass (returned, unless too big).
    """
    normals: dict[str, _Normal] = {}
    pending = set()
    batch = [0]
    handles = []
    for name, module, _, _, _ in layers:
        def pre(mod, inputs, name=name):
            b = batch[0]
            x = _input_rows(mod, inputs[0][picks[name][b]])
            if mod.bias is not None:
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
            y = targets[name][b]
            acc = normals.get(name)
            if acc is None:
                zeros = functools.partial(torch.zeros, dtype=torch.float64, device=x.device)
                acc = normals[name] = _Normal(zeros(x.shape[1], x.shape[1]), zeros(x.shape[1], y.shape[1]))
            # float32 products (fast), float64 sums (the normal equations are then solved in float64)
            acc.xtx += (x.T @ x).double()
            acc.xty += (x.T @ y).double()
            acc.yty += float((y.double() * y.double()).sum())
            acc.rows += len(x)
            pending.discard(name)
            if not pending:
                raise _Stop  # nothing after the last collected layer is needed
        handles.append(module.register_forward_pre_hook(pre))
    recorded: dict[nn.Module, list[torch.Tensor]] = {}
    handles += record_outputs(record, recorded)
    # clone: in-place ops after a replayed module (ReLU(inplace=True)) must not alter the store
    getters = {m: (lambda outs=outs: outs[batch[0]].clone()) for m, outs in replay.items()}
    try:
        with torch.no_grad(), replaying(getters):
            for b, (x, _) in enumerate(calibration):
                batch[0] = b
                pending.update(name for name, *_ in layers)
                _forward(pruned, x)
    finally:
        for h in handles:
            h.remove()
    size = sum(t.numel() * t.element_size() for outs in recorded.values() for t in outs)
    if size > _REPLAY_BYTES:
        recorded = {}  # too big to keep: the next pass recomputes
    return normals, recorded


def _current_solution(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach().flatten(1).T.double()
    if module.bias is not None:
        w = torch.cat([w, module.bias.detach().double()[None]], 0)
    return w


def _error(normal: _Normal, w: torch.Tensor) -> float:
    sq = float((w * (normal.xtx @ w)).sum() - 2 * (w * normal.xty).sum() + normal.yty)
    return max(sq, 0.0) / max(normal.yty, 1e-30)


def _fit(layer, normal: _Normal | None, entry: LayerReport, config: CaPConfig) -> None:
    name, module, _, _, _ = layer
    if normal is None:
        _skip(entry, "not executed on the calibration data")
        return
    w0 = _current_solution(module)
    entry.error_before = _error(normal, w0)
    d = module.weight[0].numel()
    diag = torch.diagonal(normal.xtx)[:d]
    lam = config.ridge * float(diag.mean()) if float(diag.mean()) > 0 else config.ridge
    penalty = torch.zeros(normal.xtx.shape[0], dtype=normal.xtx.dtype, device=normal.xtx.device)
    penalty[:d] = max(lam, 1e-12)  # a tiny floor keeps dead (all-zero) inputs solvable
    try:
        w = torch.linalg.solve(normal.xtx + torch.diag(penalty), normal.xty)
    except RuntimeError:  # singular even with the floor (e.g. bias column of an empty input)
        w = torch.linalg.lstsq(normal.xtx + torch.diag(penalty), normal.xty).solution
    entry.error_after = _error(normal, w)
    if not math.isfinite(entry.error_after) or entry.error_after > entry.error_before:
        log.info("cap: layer %r kept its weights (fit error %.4g >= current %.4g)", name,
                 entry.error_after, entry.error_before)
        entry.error_after = entry.error_before
        return
    with torch.no_grad():
        module.weight.copy_(w[:d].T.reshape(module.weight.shape).to(module.weight.dtype))
        if module.bias is not None:
            module.bias.copy_(w[d].to(module.bias.dtype))


# -- the registered recoveries ---------------------------------------------------------------------
def _require_calibration(name: str, calibration) -> None:
    if not calibration:
        raise ValueError(
            f"recovery {name!r} needs calibration batches; none were given (calibration_samples must be > 0)"
        )


@register_recovery("cap")
def cap_recovery(pruned: nn.Module, *, base, task, settings, calibration) -> nn.Module:
    """Least-squares compensation of the consumers of removed channels, then adaptive BN."""
    _require_calibration("cap", calibration)
    report = compensate(pruned, base, calibration, CaPConfig(seed=settings.seed))
    log.debug("cap: %d layer(s) refitted, %d skipped, %.3f s", len(report.compensated), len(report.skipped),
              report.seconds)
    return recover("adaptive_bn", pruned, base=base, task=task, settings=settings, calibration=calibration)


@register_recovery("cap_nobn")
def cap_without_bn_recovery(pruned: nn.Module, *, base, task, settings, calibration) -> nn.Module:
    """The compensation alone, BN statistics left as trained.

    The refitted layers reproduce the unpruned layers' outputs, so the trained BN
    statistics behind them stay (nearly) right, and they were estimated on the whole train
    split rather than on a few calibration batches (compared with ``cap`` in
    benchmarks/results/methods.md).
    """
    _require_calibration("cap_nobn", calibration)
    compensate(pruned, base, calibration, CaPConfig(seed=settings.seed))
    return pruned
