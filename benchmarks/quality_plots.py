"""The search-quality plots of one task: Pareto fronts per method (first seed) and
hypervolume vs trials (mean +- std over seeds)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.quality_presets import BASELINES, UNIFORM


def _front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated (flops_ratio, accuracy) points, sorted by FLOPs."""
    front, best = [], -1.0
    for f, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if a > best:
            front.append((f, a))
            best = a
    return front


def plot_task(result: Mapping[str, Any], out_dir: Path, levels: Sequence[float], max_flops: float,
              suffix: str = "") -> dict[str, str]:
    """Pareto fronts per method (first seed) and hypervolume vs trials (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(result["per_seed"])}
    stem = out_dir / f"search_quality_{result['task']}{suffix}"
    pareto = _plot_fronts(plt, result, colours, levels, max_flops, Path(f"{stem}_pareto.png"))
    hv_path = _plot_hypervolume(plt, result, colours, Path(f"{stem}_hypervolume.png"))
    return {"pareto": pareto.name, "hypervolume": hv_path.name}


def _plot_fronts(plt: Any, result: Mapping[str, Any], colours: Mapping[str, Any], levels: Sequence[float],
                 max_flops: float, path: Path) -> Path:
    per_seed = result["per_seed"]
    searchers = [m for m in per_seed if m not in BASELINES]
    seed0 = sorted(per_seed[UNIFORM], key=int)[0]
    uni = [(p["flops_ratio"], p["accuracy"]) for p in per_seed[UNIFORM][seed0]["points"] if p["ok"]]
    cols = 4
    rows = math.ceil(len(searchers) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), dpi=110, sharex=True, sharey=True,
                             squeeze=False)
    for ax, method in zip(axes.flat, searchers):
        _plot_method(ax, per_seed[method][seed0], colours[method])
        ax.plot(*zip(*sorted(uni)), "--", color="black", lw=1, label="uniform")
        for b in (b for b in BASELINES if b != UNIFORM and b in per_seed):  # global pruning, no search
            pts = sorted((p["flops_ratio"], p["accuracy"]) for p in per_seed[b][seed0]["points"] if p["ok"])
            if pts:
                ax.plot(*zip(*pts), ":", color=colours[b], lw=1, label=b)
        for lv in levels:
            ax.axvline(lv, color="grey", lw=0.6, ls=":")
        ax.axvline(max_flops, color="red", lw=0.8, ls="--")
        ax.set_title(f"{method} (HV {per_seed[method][seed0]['hypervolume']:.3f})", fontsize=9)
    for ax in list(axes.flat)[len(searchers):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="lower right")
    for ax in axes[:, 0]:
        ax.set_ylabel("proxy accuracy")
    for ax in axes[-1, :]:
        ax.set_xlabel("FLOPs ratio")
    fig.suptitle(f"{result['task']}: trials and feasible Pareto front per searcher (seed {seed0}; dashed: uniform; "
                 f"red: max FLOPs {max_flops})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_method(ax: Any, study: Mapping[str, Any], colour: Any) -> None:
    """One study's trials (cheap fidelity hollow) and its feasible front."""
    full = [p for p in study["points"] if p["ok"] and p["fidelity"] == "full"]
    cheap = [p for p in study["points"] if p["ok"] and p["fidelity"] != "full"]
    ax.scatter([p["flops_ratio"] for p in cheap], [p["accuracy"] for p in cheap], s=10, facecolors="none",
               edgecolors="grey", alpha=0.6, label="cheap fidelity")
    ax.scatter([p["flops_ratio"] for p in full], [p["accuracy"] for p in full], s=12, color=colour,
               alpha=0.7, label="trials")
    front = _front([(p["flops_ratio"], p["accuracy"]) for p in full if p["feasible"]])
    if front:
        ax.plot(*zip(*front), "-o", color=colour, ms=3, lw=1.5, drawstyle="steps-post", label="front")
    ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)


def _plot_hypervolume(plt: Any, result: Mapping[str, Any], colours: Mapping[str, Any], path: Path) -> Path:
    per_seed = result["per_seed"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for method in per_seed:
        if method in BASELINES:
            hv = [per_seed[method][s]["hypervolume"] for s in per_seed[method]]
            ls = "--" if method == UNIFORM else ":"
            ax.axhline(statistics.fmean(hv), color="black" if method == UNIFORM else colours[method], ls=ls, lw=1,
                       label=f"{method} (no search)")
            continue
        curves = np.array([per_seed[method][s]["hv_curve"] for s in sorted(per_seed[method], key=int)], dtype=float)
        x = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(0), curves.std(0)
        ax.plot(x, mean, color=colours[method], label=method)
        ax.fill_between(x, mean - std, mean + std, color=colours[method], alpha=0.15)
    ax.set_xlabel("trials (budget spent)")
    ax.set_ylabel("hypervolume (ref. point (1, 1))")
    ax.set_title(f"{result['task']}: hypervolume of feasible full-fidelity trials (mean ± std over seeds)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
