"""What ``prunesearch run`` and ``status`` print: the budget line, trials by state, the
Pareto table with the unpruned base model as its first row and each trial's accuracy drop
(a task with its own metrics, e.g. perplexity: a column per metric instead)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    return lines + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]


def _num(value: Any, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, fmt)


def accuracy_note(settings: Any, base: Mapping[str, Any] | None = None) -> str:
    """Which accuracy a trial's is: the search's proxy, after the study's recovery, on how
    many validation samples (the base model is scored on the very same samples)."""
    recovery = settings.recovery
    if recovery == "finetune":
        recovery += f" ({settings.finetune_steps} steps)"
    elif settings.calibration_samples:
        recovery += f" ({settings.calibration_samples} calibration samples)"
    samples = (base or {}).get("eval_samples") or settings.eval_samples
    names = ", ".join((base or {}).get("values") or ["accuracy"])
    return (f"{names}: search proxy after recovery {recovery}, on "
            f"{samples if samples is not None else 'all'} validation samples")


def format_front(front: Sequence[Any], objectives: Sequence[str], base: Mapping[str, Any] | None = None,
                 note: str | None = None) -> str:
    """The Pareto table: the unpruned base model (when known), then one row per trial on the
    feasible full-fidelity front with its accuracy drop against the base; ``note`` (e.g.
    ``accuracy_note``) says which accuracy the column holds."""
    if not front:  # the base has its own line above the table in run and status
        return "Pareto front: empty (no feasible full-fidelity trial yet)"
    names = metric_columns(front, base)
    if names != ["accuracy"]:
        return _task_front(front, names, objectives, base, note)
    latency = "latency_ms" in objectives
    head = ["trial", "searcher", "gen", "accuracy", "acc_drop", "flops_ratio", "params_ratio", "MFLOPs"]
    head += ["latency_ms"] if latency else []
    rows = []
    if base is not None:
        rows.append(["base", "(unpruned)", "-", _num(base.get("accuracy"), ".4f"), "-", "1.0000", "1.0000",
                     _num(base.get("flops"), ".3f", 1e6)] + ([_num(base.get("latency_ms"), ".3f")] if latency else []))
    for r in front:
        m = r.metrics
        drop = base["accuracy"] - m.accuracy if base is not None and m.accuracy is not None else None
        row = [str(r.number), r.searcher, str(r.generation), _num(m.accuracy, ".4f"), _num(drop, "+.4f"),
               _num(m.flops_ratio, ".4f"), _num(m.params_ratio, ".4f"), _num(m.flops, ".3f", 1e6)]
        rows.append(row + ([_num(m.latency_ms, ".3f")] if latency else []))
    title = f"Pareto front ({len(front)} trial{'s' if len(front) != 1 else ''}, feasible, full fidelity"
    title += rung_note(front)
    title += "; acc_drop = base accuracy - trial accuracy):" if base is not None else "):"
    return "\n".join([title, *([f"({note})"] if note else []), *_table(head, rows)])


def rung_note(front: Sequence[Any]) -> str:
    """``"; after the 200-step promotion fine-tune"`` when the front's metrics come from a
    promotion rung (``search.promotion``), else ``""``."""
    steps = max((getattr(r, "rung_steps", 0) for r in front), default=0)
    return f"; metrics after the {steps}-step promotion fine-tune, not the proxy" if steps else ""


def metric_columns(front: Sequence[Any], base: Mapping[str, Any] | None) -> list[str]:
    """The task's metric names (the front's ``Metrics.values``, else the base's); ``["accuracy"]``
    for records made before tasks had their own metrics."""
    for values in [*(r.metrics.values for r in front if r.metrics is not None), (base or {}).get("values")]:
        if values:
            return list(values)
    return ["accuracy"]


def _task_front(front: Sequence[Any], names: Sequence[str], objectives: Sequence[str],
                base: Mapping[str, Any] | None, note: str | None) -> str:
    """The Pareto table of a task with its own metrics: one column per metric."""
    latency = "latency_ms" in objectives
    head = ["trial", "searcher", "gen", *names, "flops_ratio", "params_ratio", "MFLOPs"]
    head += ["latency_ms"] if latency else []
    rows = []
    if base is not None:
        values = base.get("values") or {}
        rows.append(["base", "(unpruned)", "-", *(_num(values.get(n), ".4f") for n in names), "1.0000", "1.0000",
                     _num(base.get("flops"), ".3f", 1e6)] + ([_num(base.get("latency_ms"), ".3f")] if latency else []))
    for r in front:
        m = r.metrics
        row = [str(r.number), r.searcher, str(r.generation), *(_num(m.values.get(n), ".4f") for n in names),
               _num(m.flops_ratio, ".4f"), _num(m.params_ratio, ".4f"), _num(m.flops, ".3f", 1e6)]
        rows.append(row + ([_num(m.latency_ms, ".3f")] if latency else []))
    title = f"Pareto front ({len(front)} trial{'s' if len(front) != 1 else ''}, feasible, full fidelity"
    title += rung_note(front) + "):"
    return "\n".join([title, *([f"({note})"] if note else []), *_table(head, rows)])


def format_states(records: Sequence[Any]) -> str:
    """Trials by searcher (rows) and state/fidelity (columns)."""
    counts = Counter((r.searcher, r.state.name) for r in records)
    fidelity = Counter((r.searcher, r.fidelity) for r in records)
    states = sorted({s for _, s in counts})
    searchers = sorted({n for n, _ in counts})
    fids = sorted({f for _, f in fidelity})
    promoted = Counter(r.searcher for r in records if getattr(r, "rung_steps", 0) > 0)
    extra = ["promoted"] if promoted else []   # trials fine-tuned by [promotion] rungs
    head = ["searcher", *states, *(f"fid:{f}" for f in fids), *extra, "total"]
    rows = [[n, *(str(counts[(n, s)]) for s in states), *(str(fidelity[(n, f)]) for f in fids),
             *([str(promoted[n])] if extra else []), str(sum(counts[(n, s)] for s in states))] for n in searchers]
    rows.append(["all", *(str(sum(counts[(n, s)] for n in searchers)) for s in states),
                 *(str(sum(fidelity[(n, f)] for n in searchers)) for f in fids),
                 *([str(sum(promoted.values()))] if extra else []), str(len(records))])
    return "\n".join(_table(head, rows))


def format_budget(finished: int, configured: int | None, asked: int | None) -> str:
    """``"40 finished of n_trials 40 (...)"``: the budget the latest run was given, and the
    config's when a run's ``--n-trials`` changed it."""
    budget = asked if asked is not None else configured
    if budget is None:
        return f"{finished} finished (no trial budget: timeout_s only)"
    text = f"{finished} finished of n_trials {budget}"
    if configured != budget:
        text += (f" (the latest run's --n-trials; [study] n_trials is {configured})" if configured is not None
                 else " (the latest run's --n-trials; [study] sets no n_trials)")
    return text
