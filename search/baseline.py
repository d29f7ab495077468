"""The unpruned model as every study's reference: measured once, shown everywhere.

``measure_base`` measures the task's unpruned base model on the study's own evaluation
setting (``evaluators.evaluate.evaluate_model``: the same validation samples, batch size
and threads every trial is scored on) at set-up; ``search.setup.open_study`` stores the
result in the study's user attr ``base``, so ``status``, ``export``, optuna-dashboard and
the Python API read it without measuring again. ``format_base`` and ``drop`` are how the
CLI and the export show a trial against it.

The stored dict: ``accuracy``, ``flops`` (multiply-accumulates per sample), ``params``,
``latency_ms`` (None unless the study measures latency), ``values`` (the task's metrics,
name -> value: ``{"accuracy": ...}`` for a classifier; None for a task without ``accuracy``
is then ``accuracy``), ``eval_samples`` (validation samples the metrics are over) and
``fidelity`` (always the study's full fidelity).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from search.config import StudyConfig
from search.storage import STUDY_ATTR_BASE

log = logging.getLogger(__name__)

BASE_FIELDS = ("accuracy", "flops", "params", "latency_ms", "values")


def measure_base(config: StudyConfig, task: Any) -> dict[str, Any] | None:
    """The unpruned model's metrics on the study's evaluation setting (None, with a warning
    in the log, when the base model cannot be measured: every trial would then fail too)."""
    from evaluators.evaluate import evaluate_model

    settings = config.evaluation
    try:
        metrics = evaluate_model(task.base_model(), task, settings)
        samples = task.sample_count("validation", settings.eval_samples)   # no second read of the split
    except Exception as exc:  # a broken task shows up in every trial's error as well
        log.warning("the unpruned base model could not be measured: %s: %s", type(exc).__name__, exc)
        return None
    base: dict[str, Any] = {name: getattr(metrics, name) for name in BASE_FIELDS}
    base.update(eval_samples=samples, fidelity=settings.fidelity)
    log.info("unpruned base model: %s", format_base(base))
    return base


def stored_base(user_attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The study's stored base metrics (None for a study set up before they were recorded)."""
    base = user_attrs.get(STUDY_ATTR_BASE)
    measured = isinstance(base, Mapping) and (base.get("accuracy") is not None or bool(base.get("values")))
    return dict(base) if measured else None


def quality_text(metrics: Mapping[str, Any]) -> str:
    """The task's metrics of a metrics dict (``Metrics.to_dict``, a stored base) on one line:
    ``accuracy 0.9833``, ``perplexity 3.1200``; older records without ``values``: their accuracy."""
    values = metrics.get("values") or {"accuracy": metrics.get("accuracy")}
    return ", ".join(f"{name} {value:.4f}" if value is not None else f"{name} -" for name, value in values.items())


def format_base(base: Mapping[str, Any] | None) -> str:
    """One line: ``accuracy 0.9833 on 360 validation samples, 1.234 MFLOPs, 0.0456 M params``."""
    if base is None:
        return "not recorded (a study set up before base metrics were stored: `prunesearch run` records them)"
    parts = [f"{quality_text(base)} on {base.get('eval_samples', '?')} validation samples"]
    if base.get("flops") is not None:
        parts.append(f"{base['flops'] / 1e6:.3f} MFLOPs")
    if base.get("params") is not None:
        parts.append(f"{base['params'] / 1e6:.4f} M params")
    if base.get("latency_ms") is not None:
        parts.append(f"{base['latency_ms']:.3f} ms")
    return ", ".join(parts)


def drop(metrics: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, float | None]:
    """A model against the base: ``accuracy_drop`` (base - model, in accuracy points of 1.0),
    ``flops_ratio`` and ``params_ratio`` (model / base), ``changes`` (each task metric, model
    - base); None where either side is missing."""
    def ratio(name: str) -> float | None:
        a, b = metrics.get(name), (base or {}).get(name)
        return float(a) / float(b) if a is not None and b else None

    acc, ref = metrics.get("accuracy"), (base or {}).get("accuracy")
    ours, theirs = metrics.get("values") or {}, (base or {}).get("values") or {}
    changes = {k: float(v) - float(theirs[k]) if v is not None and theirs.get(k) is not None else None
               for k, v in ours.items()}
    return {"accuracy_drop": float(ref) - float(acc) if acc is not None and ref is not None else None,
            "flops_ratio": ratio("flops"), "params_ratio": ratio("params"), "changes": changes}
