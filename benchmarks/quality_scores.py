"""What one study scored: its points, hypervolume (final and per trial) and best feasible
accuracy per FLOPs level; the same for the baselines (the uniform sweep, the global-pruning
heuristics at FLOPs targets)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.hypervolume import hypervolume, hypervolume_curve


def _point(metrics: Any) -> dict[str, Any] | None:
    if metrics is None or not metrics.ok or metrics.flops_ratio is None:
        return None
    return {"accuracy": float(metrics.accuracy), "flops_ratio": float(metrics.flops_ratio)}


def _best_at(points: Sequence[dict[str, Any]], level: float) -> dict[str, Any] | None:
    """The most accurate feasible full-fidelity point with FLOPs ratio <= level (ties: fewer
    FLOPs), among those at the highest promotion rung reached at that level (what the
    study's front selects on: ``search.records.pareto_front``)."""
    cands = [p for p in points if p["feasible"] and p["fidelity"] == "full" and p["flops_ratio"] <= level + 1e-12]
    if not cands:
        return None
    top = max(p.get("rung_steps", 0) for p in cands)
    return max((p for p in cands if p.get("rung_steps", 0) == top), key=lambda p: (p.get("selected_by", p["accuracy"]), -p["flops_ratio"]))


def _best_per_level(points: Sequence[dict[str, Any]], levels: Sequence[float],
                    policies: dict[int, Any]) -> dict[str, dict[str, Any] | None]:
    """``{str(level): best point at that level with its policy, or None}``."""
    best = {}
    for lv in levels:
        b = _best_at(points, lv)
        best[str(lv)] = None if b is None else {**b, "policy": policies.get(b["trial"])}
    return best


def _proxy_score(record: Any, point: dict[str, Any] | None) -> float | None:
    if point is None:
        return None
    rungs = record.promotion.get("rungs") if record.promotion else None
    return float(rungs[0]["score"]) if rungs else point["accuracy"]


def _compute_s(record: Any) -> float:
    """Evaluation seconds the trial took, every promotion rung included."""
    rungs = record.promotion.get("rungs") if record.promotion else None
    if rungs:
        return float(sum(e.get("seconds") or 0.0 for e in rungs))
    return float(record.metrics.eval_seconds) if record.metrics is not None else 0.0


def study_result(summary: Any, levels: Sequence[float], hv_levels: Sequence[float] = ()) -> dict[str, Any]:
    """Per-trial points, hypervolume (final and per trial), best feasible accuracy per level
    and the models at ``hv_levels`` whose fine-tuned hypervolume is measured (``hv_models``)."""
    from optuna.trial import TrialState

    points, policies = [], {}
    for r in sorted(summary.records, key=lambda r: r.number):
        if not r.evaluated:
            continue
        p = _point(r.metrics) if r.state == TrialState.COMPLETE else None
        points.append({
            "trial": r.number, "searcher": r.searcher, "fidelity": r.fidelity,
            "feasible": bool(r.feasible), "ok": p is not None,
            # the proxy score (a promoted trial's rung 0), comparable across methods
            "accuracy": _proxy_score(r, p), "flops_ratio": p["flops_ratio"] if p else None,
            "rung_steps": r.rung_steps, "selected_by": p["accuracy"] if p else None,
            "compute_s": _compute_s(r),
        })
        if r.meta and r.meta.get("masking_target") is not None:  # a masking run's proposal
            points[-1]["masking_target"] = float(r.meta["masking_target"])
        if r.policy is not None:
            policies[r.number] = r.policy.to_dict()
    counted = [(p["accuracy"], p["flops_ratio"]) if p["ok"] and p["feasible"] and p["fidelity"] == "full" else None
               for p in points]
    curve = hypervolume_curve(counted)
    best = _best_per_level([p for p in points if p["ok"]], levels, policies)
    return {
        "hv_models": _best_per_level([p for p in points if p["ok"]], hv_levels, policies),
        "trials": len(points),
        "full_fidelity_trials": sum(p["fidelity"] == "full" for p in points),
        "feasible_full_trials": sum(c is not None for c in counted),
        "failed": sum(not p["ok"] for p in points),
        "evaluations": summary.evaluations,
        "cached": summary.cached,
        "wall_s": summary.elapsed_s,
        "compute_s": sum(p["compute_s"] for p in points),
        "promoted": sum(p["rung_steps"] > 0 for p in points),
        "driver_ms_per_trial": summary.driver_ms_per_trial,
        "hypervolume": curve[-1] if curve else 0.0,
        "hv_curve": curve,
        "best_proxy": best,
        "points": points,
    }


def uniform_result(evaluated: Sequence[tuple[Any, Any]], levels: Sequence[float], max_flops: float,
                   hv_levels: Sequence[float] = ()) -> dict[str, Any]:
    """The uniform sweep as a method: ``evaluated`` = (policy, metrics) pairs."""
    points, policies = [], {}
    for i, (policy, m) in enumerate(sorted(evaluated, key=lambda pm: max(pm[0].ratios.values()))):
        p = _point(m)
        points.append({"trial": i, "ratio": max(policy.ratios.values()), "fidelity": "full", "ok": p is not None,
                       "feasible": p is not None and p["flops_ratio"] <= max_flops + 1e-12,
                       "accuracy": p["accuracy"] if p else None, "flops_ratio": p["flops_ratio"] if p else None})
        policies[i] = policy.to_dict()
    ok = [p for p in points if p["ok"]]
    best = _best_per_level(ok, levels, policies)
    feasible = [(p["accuracy"], p["flops_ratio"]) for p in ok if p["feasible"]]
    return {"trials": len(points), "evaluations": len(points), "hypervolume": hypervolume(feasible),
            "best_proxy": best, "points": points, "hv_models": _best_per_level(ok, hv_levels, policies)}


def heuristic_result(evaluated: Sequence[tuple[float, Any, Any]], levels: Sequence[float],
                     max_flops: float, hv_levels: Sequence[float] = ()) -> dict[str, Any]:
    """A search-free heuristic as a method: ``evaluated`` = (FLOPs target, policy, metrics)."""
    points, policies = [], {}
    for i, (target, policy, m) in enumerate(sorted(evaluated, key=lambda tpm: tpm[0])):
        p = _point(m)
        points.append({"trial": i, "target": float(target), "fidelity": "full", "ok": p is not None,
                       "feasible": p is not None and p["flops_ratio"] <= max_flops + 1e-12,
                       "accuracy": p["accuracy"] if p else None, "flops_ratio": p["flops_ratio"] if p else None})
        policies[i] = policy.to_dict()
    ok = [p for p in points if p["ok"]]
    feasible = [(p["accuracy"], p["flops_ratio"]) for p in ok if p["feasible"]]
    return {"trials": len(points), "evaluations": len(points), "hypervolume": hypervolume(feasible),
            "best_proxy": _best_per_level(ok, levels, policies), "points": points,
            "hv_models": _best_per_level(ok, hv_levels, policies)}
