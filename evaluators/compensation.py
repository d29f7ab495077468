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
valid and are better estimated than from a few calibration batches). Cost and accuracy
on digits: ``benchmarks/methods.py`` (about 1 s per evaluation vs 0.15 s for adaptive BN,
one core, 256 calibration samples).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluators.recover import recover, register_recovery
from evaluators.shapley import ForwardSchedule, record_outputs, replaying

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]

_REPLAY_BYTES = 512 * 2**20  # activations kept between passes, at most


@dataclass(frozen=True)
class CaPConfig:
    """Options of the least-squares compensation."""

    ridge: float = 1e-3          # relative ridge term (fraction of the mean diagonal of X^T X)
    max_rows: int = 4096         # sampled output positions per layer (over all batches)
    sequential: bool = True      # re-collect X after compensating the layers before
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or not math.isfinite(self.ridge) \
                or self.ridge < 0:
            raise ValueError(f"cap ridge must be a number >= 0, got {self.ridge!r}")
        if isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int) or self.max_rows < 1:
            raise ValueError(f"cap max_rows must be an integer >= 1, got {self.max_rows!r}")
        if not isinstance(self.sequential, bool):
            raise ValueError(f"cap sequential must be true or false, got {self.sequential!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"cap seed must be an integer >= 0, got {self.seed!r}")


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


# -- which layers, which channels ----------------------------------------------------------
def _in_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
        return weight.shape[1]
    return None


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(t % 2 for t in total):
        return None  # asymmetric "same" padding: not expressible with F.unfold
    return tuple(t // 2 for t in total)


def _unsupported(module: nn.Module) -> str | None:
    """Why ``module`` (whose input width shrank) cannot be compensated, or None."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return (f"grouped/depthwise conv (groups={module.groups}): each output reads only its own input "
                    "channels, which were removed together with it")
        if module.padding_mode != "zeros":
            return f"padding_mode {module.padding_mode!r} is not zero padding"
        if _conv_padding(module) is None:
            return "asymmetric 'same' padding"
        return None
    return f"{type(module).__name__} is not a Conv2d or Linear (not compensated as linear in its inputs)"


def _match_rows(small: torch.Tensor, big: torch.Tensor, same_width: bool) -> list[int] | None:
    """Indices i_0 < i_1 < ... of ``big``'s rows that ``small``'s rows were taken from.

    ``same_width``: rows are compared whole; otherwise a row matches when every value of
    the small row occurs in the big row (its columns were sliced too). Candidates are the
    big rows holding the small row's first value, found by binary search in the sorted
    values (memory linear in the weights).
    """
    width = big.shape[1]
    values, order = torch.sort(big.reshape(-1))
    firsts = small[:, 0].contiguous()
    lo = torch.searchsorted(values, firsts, right=False).tolist()
    hi = torch.searchsorted(values, firsts, right=True).tolist()
    picked: list[int] = []
    j = 0
    for r, row in enumerate(small):
        found = None
        for c in sorted({int(i) // width for i in order[lo[r]:hi[r]]}):
            if c < j:
                continue
            cand = big[c]
            if torch.equal(row, cand) if same_width else bool(torch.isin(row, cand).all()):
                found = c
                break
        if found is None:
            return None
        picked.append(found)
        j = found + 1
    return picked


def kept_indices(pruned_weight: torch.Tensor, base_weight: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """(kept output rows, kept input columns) of ``base_weight`` giving ``pruned_weight``.

    Works on ``[out, in, *kernel]`` weights; None when no exact match exists.
    """
    p, b = pruned_weight.detach(), base_weight.detach()
    if p.dim() != b.dim() or p.shape[2:] != b.shape[2:]:
        return None
    rows_p, rows_b = p.flatten(1), b.flatten(1)
    if p.shape[0] == b.shape[0]:
        rows = list(range(b.shape[0]))
    else:
        rows = _match_rows(rows_p, rows_b, same_width=p.shape[1] == b.shape[1])
        if rows is None:
            return None
    sub = b[rows]
    cols = _match_rows(p.transpose(0, 1).flatten(1), sub.transpose(0, 1).flatten(1), same_width=True)
    if cols is None or not torch.equal(b[rows][:, cols], p):
        return None
    return rows, cols


# -- data collection -------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a hook once it captured what it needs (skips the rest of the forward)."""


def _input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One row per output position: im2col patches (conv, ``(C, kh, kw)`` order = weight
    layout) or feature rows (linear)."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=_conv_padding(module),
                        stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _output_rows(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    try:
        model(x)
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
    base_modules = dict(base.named_modules())
    layers: list[tuple[str, nn.Module, nn.Module, list[int], list[int]]] = []
    for name, module in pruned.named_modules():
        ref = base_modules.get(name)
        if ref is None or type(ref) is not type(module):
            continue
        width, ref_width = _in_width(module), _in_width(ref)
        if width is None or ref_width is None or width >= ref_width:
            continue
        entry = LayerReport(name, type(module).__name__, ref_width, width)
        report.layers.append(entry)
        entry.skipped = _unsupported(module)
        if entry.skipped is None:
            kept = kept_indices(module.weight, ref.weight)
            if kept is None:
                entry.skipped = "its weights do not match a slice of the base layer's (modified after pruning?)"
            else:
                layers.append((name, module, ref, *kept))
        if entry.skipped is not None:
            log.info("cap: layer %r not compensated: %s", name, entry.skipped)
    if not layers:
        report.seconds = time.perf_counter() - start
        return report

    was_training, base_was_training = pruned.training, base.training
    pruned.eval()
    base.eval()
    try:
        x1 = calibration[0][0][:1]
        schedule = ForwardSchedule(pruned, lambda: pruned(x1))
        entries = {r.name: r for r in report.layers}
        for layer in list(layers):
            if schedule.calls(layer[1]) > 1:
                entries[layer[0]].skipped = "called more than once per forward (shared weights)"
                log.info("cap: layer %r not compensated: %s", layer[0], entries[layer[0]].skipped)
                layers.remove(layer)
        layers.sort(key=lambda item: schedule.start([item[1]]) or math.inf)
        targets, picks = _base_targets(base, calibration, layers, config)
        if config.sequential:
            replay: dict[nn.Module, list[torch.Tensor]] = {}
            for layer in layers:
                # Outputs of modules that finished before this layer started stay valid after
                # it is refitted: the next pass replays them instead of recomputing.
                record = schedule.skippable(schedule.start([layer[1]]))
                normals, replay = _collect(pruned, calibration, [layer], targets, picks, replay, record)
                _fit(layer, normals.get(layer[0]), entries[layer[0]], config)
        else:
            normals, _ = _collect(pruned, calibration, layers, targets, picks, {}, [])
            for layer in layers:
                _fit(layer, normals.get(layer[0]), entries[layer[0]], config)
    finally:
        pruned.train(was_training)
        base.train(base_was_training)
    report.seconds = time.perf_counter() - start
    log.debug("cap: compensated %d layer(s) in %.3f s", len(report.compensated), report.seconds)
    return report


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
            idx = torch.randperm(len(output), generator=gen)[:take].sort().values
            picks[name].append(idx)
            targets[name].append(_output_rows(mod, output[idx])[:, rows].float())
        handles.append(ref.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for x, _ in calibration:
                base(x)
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
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            y = targets[name][b]
            acc = normals.get(name)
            if acc is None:
                acc = normals[name] = _Normal(torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64),
                                              torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64))
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
        entry.skipped = "not executed on the calibration data"
        log.info("cap: layer %r not compensated: %s", name, entry.skipped)
        return
    w0 = _current_solution(module)
    entry.error_before = _error(normal, w0)
    d = module.weight[0].numel()
    diag = torch.diagonal(normal.xtx)[:d]
    lam = config.ridge * float(diag.mean()) if float(diag.mean()) > 0 else config.ridge
    penalty = torch.zeros(normal.xtx.shape[0], dtype=normal.xtx.dtype)
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
    split rather than on a few calibration batches: on digits this beats ``cap`` at high
    pruning ratios (benchmarks/results/methods.md).
    """
    _require_calibration("cap_nobn", calibration)
    compensate(pruned, base, calibration, CaPConfig(seed=settings.seed))
    return pruned
