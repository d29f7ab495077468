"""The search-quality report: per-method summaries over seeds (paired against uniform and
against the better baseline), masking per target, the issue's target checks, and the
markdown tables."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from benchmarks.quality_presets import BASELINES, TARGETS, UNIFORM


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None),
        "values": list(values),
        "n": len(vals),
    }


def _acc(entry: Mapping[str, Any] | None) -> float | None:
    return entry.get("accuracy") if entry else None


def _best_baseline(per_seed: Mapping[str, Any], seed: str, key: str, level: str) -> float | None:
    """The better baseline's accuracy (uniform, global pruning: those that ran) for one seed and level."""
    accs = [_acc(per_seed[b][seed].get(key, {}).get(level)) for b in BASELINES if seed in per_seed.get(b, {})]
    accs = [a for a in accs if a is not None]
    return max(accs) if accs else None


def summarize(result: dict[str, Any], levels: Sequence[float]) -> dict[str, Any]:
    """Mean ± std over seeds; per-seed paired deltas against uniform (``*_delta``) and against
    the better of the baselines (``*_vs_baselines``); HV ratio to random."""
    per_seed = result["per_seed"]
    seeds = sorted(per_seed[UNIFORM], key=int)
    out: dict[str, Any] = {}
    for method, runs in per_seed.items():
        row: dict[str, Any] = {"hypervolume": _stats([runs[s]["hypervolume"] for s in seeds]),
                               "finetuned_hv": _stats([runs[s].get("finetuned_hv") for s in seeds]),
                               "wall_s": _stats([runs[s].get("wall_s") for s in seeds]),
                               "compute_s": _stats([runs[s].get("compute_s") for s in seeds]),
                               "proxy": {}, "finetuned": {},
                               "proxy_delta": {}, "finetuned_delta": {}, "proxy_vs_baselines": {},
                               "finetuned_vs_baselines": {}}
        for lv in map(str, levels):
            row["proxy"][lv] = _stats([_acc(runs[s]["best_proxy"].get(lv)) for s in seeds])
            row["finetuned"][lv] = _stats([_acc(runs[s].get("finetuned", {}).get(lv)) for s in seeds])
            for kind, key in (("proxy", "best_proxy"), ("finetuned", "finetuned")):
                deltas, vs_best = [], []
                for s in seeds:
                    a = _acc(runs[s].get(key, {}).get(lv))
                    b = _acc(per_seed[UNIFORM][s].get(key, {}).get(lv))
                    best = _best_baseline(per_seed, s, key, lv)
                    deltas.append(None if a is None or b is None else a - b)
                    vs_best.append(None if a is None or best is None else a - best)
                row[f"{kind}_delta"][lv] = _stats(deltas)
                row[f"{kind}_vs_baselines"][lv] = _stats(vs_best)
        if "random" in per_seed:
            ratios = [runs[s]["hypervolume"] / per_seed["random"][s]["hypervolume"] - 1.0
                      if per_seed["random"][s]["hypervolume"] > 0 else None for s in seeds]
            row["hv_vs_random"] = _stats(ratios)
        out[method] = row
    return out


def interpolate_uniform(points: Sequence[Mapping[str, Any]], flops_ratio: float) -> float | None:
    """Uniform pruning's proxy accuracy at ``flops_ratio``, linear between the two sweep
    points around it (``None`` outside the sweep's FLOPs range)."""
    curve = sorted((p["flops_ratio"], p["accuracy"]) for p in points if p["ok"])
    if not curve or not curve[0][0] - 1e-9 <= flops_ratio <= curve[-1][0] + 1e-9:
        return None
    xs, ys = zip(*curve)
    return float(np.interp(flops_ratio, xs, ys))


def masking_per_target(result: Mapping[str, Any], method: str = "masking") -> list[dict[str, Any]]:
    """Per masking target: the runs' real FLOPs ratio and proxy accuracy, and the uniform
    sweep's accuracy at each run's FLOPs ratio (same seed), paired.

    Statistics are over the target's masking runs across every study seed (each run has
    its own masking seed); ``per_seed`` keeps each study's mean.
    """
    per_seed = result["per_seed"]
    if method not in per_seed:
        return []
    runs: dict[float, list[dict[str, Any]]] = {}
    for seed, res in per_seed[method].items():
        uniform = per_seed[UNIFORM][seed]["points"]
        for p in res["points"]:
            if "masking_target" not in p or not p["ok"] or p["fidelity"] != "full":
                continue
            u = interpolate_uniform(uniform, p["flops_ratio"])
            runs.setdefault(p["masking_target"], []).append({
                "seed": seed, "flops_ratio": p["flops_ratio"], "accuracy": p["accuracy"], "uniform": u,
                "delta": None if u is None else p["accuracy"] - u})
    rows = []
    for target in sorted(runs):
        got = runs[target]
        seeds = sorted({r["seed"] for r in got}, key=int)
        rows.append({
            "target": target, "runs": len(got),
            "flops_ratio": _stats([r["flops_ratio"] for r in got]),
            "accuracy": _stats([r["accuracy"] for r in got]),
            "uniform_accuracy": _stats([r["uniform"] for r in got]),
            "delta": _stats([r["delta"] for r in got]),
            "per_seed": {s: {k: statistics.fmean(v) if v else None for k, v in (
                ("accuracy", [r["accuracy"] for r in got if r["seed"] == s]),
                ("delta", [r["delta"] for r in got if r["seed"] == s and r["delta"] is not None]))} for s in seeds},
        })
    return rows


def check_targets(task: str, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Evaluate the issue's targets for ``task``: the best searcher (by mean) against the threshold."""
    checks = []
    searchers = [m for m in summary if m not in BASELINES]
    for target in TARGETS.get(task, []):
        kind = target["kind"]
        if kind == "hv_vs_random":
            cands = {m: summary[m].get("hv_vs_random", {}).get("mean") for m in searchers if m != "random"}
        else:
            cands = {m: summary[m][kind].get(str(target["level"]), {}).get("mean") for m in searchers}
        cands = {m: v for m, v in cands.items() if v is not None}
        if not cands:
            checks.append({**target, "task": task, "best": None, "value": None, "met": False,
                           "note": "no method produced a value"})
            continue
        best = max(cands, key=cands.get)
        std = (summary[best]["hv_vs_random"] if kind == "hv_vs_random"
               else summary[best][kind][str(target["level"])])["std"]
        checks.append({**target, "task": task, "best": best, "value": cands[best], "std": std,
                       "met": cands[best] >= target["threshold"], "all": cands})
    return checks


def _pm(stats: Mapping[str, Any] | None, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    if not stats or stats.get("mean") is None:
        return "—"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(scale * stats["mean"])
    if stats.get("std") is not None and stats.get("n", 0) > 1:
        text += f" ± {scale * stats['std']:.{digits}f}"
    return text


def markdown(results: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The tables, plots and target checks for the README's Results section."""
    lines = ["## Search quality: searchers vs uniform pruning", ""]
    lines += [
        f"Equal budget of {config['n_trials']} trials (proxy evaluations) per method and seed, "
        f"{len(config['seeds'])} seed(s), objectives accuracy and FLOPs, one constraint `max_flops_ratio`. "
        "Proxy = prune (L1) + the task's proxy recovery, no fine-tune; *fine-tuned* = the best feasible proxy model of each "
        "method, seed and FLOPs level, fine-tuned identically (same steps, lr, KD from the unpruned model, seed) "
        "and scored on the whole validation split. Hypervolume: feasible full-fidelity trials in "
        "(1 - accuracy, FLOPs ratio), reference point (1, 1); *HV fine-tuned* = the same over the method's "
        "fine-tuned models (its best at `--hv-points` FLOPs levels evenly spaced up to the constraint, and at the "
        "fine-tuned levels; — when not run), so it judges what survives the fine-tune. Accuracies in %, mean ± std over seeds; Δ = paired "
        "per-seed difference to uniform; Δ best baseline = paired difference to the better of uniform, global magnitude "
        "and global LAMP (fine-tuned). Baselines without search: uniform; `global_magnitude` and `global_lamp` = "
        "Torch-Pruning global pruning (group L2 magnitude normalised by its mean, or LAMP), bisected to each FLOPs "
        "level and to the uniform sweep's FLOPs ratios. The GA's cheap-fidelity trials count in its budget but not in "
        "its front.",
        "",
    ]
    for task, res in results["tasks"].items():
        lines += _task_markdown(task, res)
    if results["targets"]:
        lines += _targets_markdown(results["targets"])
    return "\n".join(lines)


def _task_markdown(task: str, res: Mapping[str, Any]) -> list[str]:
    if "skipped" in res:
        return [f"### {task}", "", f"Skipped: {res['skipped']}", ""]
    levels = res["levels"]
    lines = [f"### {task}", "",
             f"Base model {100 * res['base_accuracy']:.1f}% ({res['validation_samples']} validation samples), "
             f"{res['base_mflops']:.1f} MFLOPs, {res['groups']} channel groups; constraint FLOPs ratio <= "
             f"{res['max_flops_ratio']}; proxy recovery `{res.get('proxy_recovery', '?')}`; fine-tune "
             f"{res['finetune_steps']} steps x {res.get('finetune_seeds', 1)} fine-tune seed(s) at FLOPs levels {', '.join(f'{int(100 * lv)}%' for lv in res.get('finetune_levels', levels))}. "
             f"Wall time {res['wall_s'] / 60:.1f} min.",
             ""]
    head = "| method | HV | HV vs random | HV fine-tuned | " + " | ".join(
        f"proxy ≤{int(100 * lv)}% | Δ | fine-tuned ≤{int(100 * lv)}% | Δ | Δ best baseline" for lv in levels
    ) + " | s/study | eval s/study |"
    lines += [head, "|" + "---|" * (6 + 5 * len(levels))]
    lines += [_method_row(method, row, levels) for method, row in res["summary"].items()]
    if res.get("masking_per_target"):
        lines += ["", "Masking per target (every masking proposal of the studies at that target: a run's own or, "
                  "with all_targets, its allocation rescaled; mean ± std over proposals; uniform = the uniform "
                  "sweep interpolated at the proposal's FLOPs ratio, same seed; Δ = paired difference):", "",
                  "| masking target | proposals | FLOPs ratio | masking proxy | uniform proxy, same FLOPs | Δ |",
                  "|---|---|---|---|---|---|"]
        for row in res["masking_per_target"]:
            lines.append(f"| {row['target']:g} | {row['runs']} | {_pm(row['flops_ratio'], scale=1.0, digits=3)} | "
                         f"{_pm(row['accuracy'])} | {_pm(row['uniform_accuracy'])} | "
                         f"{_pm(row['delta'], signed=True)} |")
    return lines + ["", f"![{task} Pareto fronts]({res['plots']['pareto']})",
                    f"![{task} hypervolume vs trials]({res['plots']['hypervolume']})", ""]


def _method_row(method: str, row: Mapping[str, Any], levels: Sequence[float]) -> str:
    cells = [f"{row['hypervolume']['mean']:.3f} ± {row['hypervolume']['std']:.3f}"
             if row["hypervolume"]["mean"] is not None else "—",
             _pm(row.get("hv_vs_random"), signed=True) + ("%" if row.get("hv_vs_random") else ""),
             _pm(row.get("finetuned_hv"), scale=1.0, digits=3)]
    for lv in map(str, levels):
        cells += [_pm(row["proxy"][lv]), _pm(row["proxy_delta"][lv], signed=True) if method != UNIFORM else "",
                  _pm(row["finetuned"][lv]),
                  _pm(row["finetuned_delta"][lv], signed=True) if method != UNIFORM else "",
                  _pm(row.get("finetuned_vs_baselines", {}).get(lv), signed=True) if method not in BASELINES else ""]
    for key in ("wall_s", "compute_s"):  # wall time; evaluation seconds summed over every rung
        value = row.get(key, {}).get("mean")
        cells.append(f"{value:.0f}" if value is not None else "—")
    return f"| {method} | " + " | ".join(cells) + " |"


def _targets_markdown(targets: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["### Targets", "", "| task | target | best method | value | threshold | met |", "|---|---|---|---|---|---|"]
    for t in targets:
        unit = " %" if t["kind"] == "hv_vs_random" else " pts"
        value = "—" if t["value"] is None else f"{100 * t['value']:+.1f}" + (
            f" ± {100 * t['std']:.1f}" if t.get("std") else "") + unit
        thr = f"{100 * t['threshold']:+.0f}" + unit
        lines.append(f"| {t['task']} | {t['name']} | {t['best'] or '—'} | {value} | {thr} | "
                     f"{'yes' if t['met'] else '**no**'} |")
    return lines + [""]
