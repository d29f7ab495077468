"""Hypervolume of (accuracy, cost ratio) points: the area they dominate in (1 - accuracy,
cost ratio) up to a reference point, after each trial or at the end."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

REFERENCE_POINT = (1.0, 1.0)  # (1 - accuracy, cost ratio): the worst corner, fixed for every method


def hypervolume(points: Iterable[tuple[float, float]], reference: Sequence[float] = REFERENCE_POINT) -> float:
    """Area dominated by ``(accuracy, cost_ratio)`` points, in (1 - accuracy, cost_ratio) up to ``reference``.

    Uses Optuna's exact hypervolume (``optuna._hypervolume.compute_hypervolume``: Optuna 5.0
    exposes no public hypervolume function; its ``plot_hypervolume_history`` uses this one).
    """
    from optuna._hypervolume import compute_hypervolume

    ref = np.asarray(reference, dtype=float)
    losses = [(1.0 - a, f) for a, f in points]
    pts = np.array([p for p in losses if p[0] < ref[0] and p[1] < ref[1]], dtype=float)
    if len(pts) == 0:
        return 0.0
    return float(compute_hypervolume(pts, ref))


def hypervolume_curve(points: Sequence[tuple[float, float] | None], reference: Sequence[float] = REFERENCE_POINT) -> list[float]:
    """Hypervolume after each trial (``None`` = a trial that adds no feasible full-fidelity point)."""
    curve, seen, hv = [], [], 0.0
    for p in points:
        if p is not None:
            seen.append(p)
            hv = hypervolume(seen, reference)
        curve.append(hv)
    return curve
