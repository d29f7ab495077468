"""Search quality: every searcher against uniform pruning at an equal budget of proxy evaluations.

For each task (default: ``digits`` and, when registered, the harder ``shapes``) and each of
three seeds, the real runner (``search.runner.run_study``, journal storage in a temporary
directory) runs one study per method with the same budget of ``n_trials`` trials (64), the
same search space, proxy evaluation, constraint and objectives ``["accuracy", "flops"]``:

* ``uniform``   — every group at one remaining ratio (Torch-Pruning, same L1 criterion, same
  recovery): the whole ratio grid plus, per reported FLOPs level, the largest continuous
  ratio whose exact FLOPs ratio (``space.flops_ratio``) is at most that level;
* ``random``, ``tpe``, ``nsga2`` — Optuna samplers; ``genetic`` — DEAP NSGA-II with the
  two-step cheap/full fitness (its cheap trials count in the budget); ``masking`` — dynamic
  channel masking (one masking run per trial); ``portfolio`` — TPE + NSGA-II + GA + masking
  sharing one study.

Reported per method and seed (raw numbers in the JSON, mean ± std over seeds in the tables):

* hypervolume of the feasible full-fidelity trials in (1 - accuracy, FLOPs ratio), fixed
  reference point (1, 1), and its curve over the trials (Optuna's exact hypervolume);
* best feasible proxy accuracy at each FLOPs level (after recovery, before fine-tune);
* the same models after one identical fine-tune (same steps, lr, KD, seed) per method, seed
  and level, measured on the whole validation split.

Every evaluation — studies, uniform sweep, fine-tunes — runs on one shared ``EvaluatorPool``
per task (its actors start once; ``run_study`` gets it through ``pool_factory``).

Writes ``benchmarks/results/search_quality.json`` (``_quick`` in quick mode), a markdown
summary next to it and, per task, ``search_quality_<task>_pareto.png`` and
``search_quality_<task>_hypervolume.png``.

    python -m benchmarks.search_quality                 # full run: digits + shapes, 3 seeds
    python -m benchmarks.search_quality --task digits   # one task
    python -m benchmarks.search_quality --quick         # CI smoke run (~1-2 min)
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.common import ROOT, base_parser, git_commit, machine_info, setup_logging, write_result  # noqa: E402

log = logging.getLogger("benchmarks.search_quality")

UNIFORM = "uniform"
REFERENCE_POINT = (1.0, 1.0)  # (1 - accuracy, FLOPs ratio): the worst corner, fixed for every method


# -- what is compared ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskPreset:
    """How one task is benchmarked: reported FLOPs levels, constraint, evaluation and fine-tune."""

    levels: tuple[float, ...]                  # report best feasible accuracy at FLOPs ratio <= level
    max_flops_ratio: float                     # the studies' constraint (steers searchers to the levels)
    evaluation: Mapping[str, Any] = field(default_factory=dict)  # proxy EvalSettings overrides
    finetune_steps: int = 100
    finetune_lr: float = 0.01
    masking_steps: int = 30
    masking_targets: tuple[float, ...] = (0.15, 0.25, 0.35, 0.45)
    options: Mapping[str, Any] = field(default_factory=dict)   # task options
    finetune_levels: tuple[float, ...] | None = None           # levels whose models are fine-tuned; None = all
    space: Mapping[str, Any] = field(default_factory=lambda: {"ratio_min": 0.2, "ratio_max": 1.0})

    def __post_init__(self) -> None:
        if not self.levels or any(not 0.0 < lv <= 1.0 for lv in self.levels):
            raise ValueError(f"levels must be FLOPs ratios in (0, 1], got {self.levels!r}")
        if not 0.0 < self.max_flops_ratio <= 1.0 or self.max_flops_ratio < max(self.levels):
            raise ValueError(f"max_flops_ratio {self.max_flops_ratio!r} must be in (0, 1] and >= every level")
        for name in ("finetune_steps", "masking_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.finetune_lr > 0:
            raise ValueError(f"finetune_lr must be > 0, got {self.finetune_lr!r}")
        if not self.masking_targets or any(not 0.0 < t <= 1.0 for t in self.masking_targets):
            raise ValueError(f"masking_targets must be FLOPs ratios in (0, 1], got {self.masking_targets!r}")
        if self.finetune_levels is not None and not set(self.finetune_levels) <= set(self.levels):
            raise ValueError(f"finetune_levels {self.finetune_levels!r} must be among levels {self.levels!r}")

    @property
    def tuned_levels(self) -> tuple[float, ...]:
        return self.levels if self.finetune_levels is None else self.finetune_levels


# Why adaptive BN as the proxy (benchmarks/results/methods.md): CaP recovers far more
# accuracy, but it costs ~1 s per digits evaluation instead of ~0.3 s, and it saturates the
# digits proxy (uniform 50% channels -> 98.7%), which leaves nothing to rank policies by.
# Adaptive BN is what EagleEye uses to rank pruned candidates before fine-tuning.
PRESETS: dict[str, TaskPreset] = {
    "digits": TaskPreset(levels=(0.3, 0.5), max_flops_ratio=0.5, finetune_steps=40, masking_steps=10,
                         masking_targets=(0.2, 0.3, 0.4, 0.5)),
    # shapes: the target is at 15% FLOPs. With per-group ratios in [0.2, 1] only 1% of random
    # policies land there (mean 37% FLOPs); ratios in [0.1, 0.8] put 20% of them at <= 15% and
    # 89% at <= 30% (mean 21%), so every searcher, random included, works in the reported
    # region; the constraint (30%) does the rest. The uniform baseline is a continuous ratio,
    # not limited by the grid. Proxy recovery is CaP (least-squares compensation, no BN pass):
    # at 15% FLOPs adaptive BN leaves every policy near chance (uniform 19%, 12 classes), a
    # proxy that cannot rank candidates (per-study results of a run with it are in
    # search_quality_shapes_adaptive_bn.txt: no searcher's mean HV reached uniform's), while CaP gives
    # uniform 63% and random policies 26-63%, for ~2x the cost. 2400 validation images: the
    # proxy scores the first 500 (one sample = 0.2 pt, the same for every policy); fine-tuned
    # models are scored on all of them. Only the target level is fine-tuned (one fine-tune
    # costs ~30 proxy evaluations there).
    "shapes": TaskPreset(levels=(0.15, 0.3), max_flops_ratio=0.3,
                         evaluation={"recovery": "cap_nobn", "eval_samples": 500},
                         space={"ratio_min": 0.1, "ratio_max": 0.8}, finetune_steps=80, finetune_levels=(0.15,),
                         masking_steps=5, masking_targets=(0.1, 0.15, 0.2, 0.25, 0.3)),
}
GENERIC_PRESET = TaskPreset(levels=(0.3, 0.5), max_flops_ratio=0.5)
QUICK = {"n_trials": 8, "seeds": (0,), "finetune_steps": 5, "masking_steps": 2}

# Targets of the issue, keyed by task: (kind, level, threshold).
TARGETS: dict[str, list[dict[str, Any]]] = {
    "digits": [{"name": "proxy accuracy, best searcher - uniform, FLOPs <= 30%", "kind": "proxy_delta",
                "level": 0.3, "threshold": 0.05}],
    "shapes": [{"name": "fine-tuned accuracy, best searcher - uniform, FLOPs <= 15%", "kind": "finetuned_delta",
                "level": 0.15, "threshold": 0.02},
               {"name": "hypervolume, best searcher / random - 1", "kind": "hv_vs_random", "threshold": 0.05}],
}


# Searcher sections per method: a registry, so a new method is one decorated function.
MethodBuilder = Callable[[TaskPreset, bool], list[dict[str, Any]]]
_METHODS: dict[str, MethodBuilder] = {}


def register_method(name: str) -> Callable[[MethodBuilder], MethodBuilder]:
    """Register the ``[[searchers]]`` list of a compared method (``fn(preset, quick)``)."""

    def wrap(fn: MethodBuilder) -> MethodBuilder:
        if name in _METHODS or name == UNIFORM:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = fn
        return fn

    return wrap


def available_methods() -> tuple[str, ...]:
    return (UNIFORM, *_METHODS)


def _masking_options(preset: TaskPreset, quick: bool) -> dict[str, Any]:
    # Masking runs are trained, so each trial costs steps x (a forward/backward pass); fewer
    # steps than the searcher's default (150) keep the 3-seed benchmark within its time budget.
    # all_targets: one trained run proposes its allocation at every target (a trial per target).
    return {"targets": list(preset.masking_targets[:1] if quick else preset.masking_targets),
            "steps": QUICK["masking_steps"] if quick else preset.masking_steps, "rerank_every": 5,
            "parallel": 2, "all_targets": True}


def _genetic_options(quick: bool) -> dict[str, Any]:
    if quick:  # no sensitivity pass: 10 trials would not get past it to a full-fidelity trial
        return {"population": 4, "top_k": 2, "sensitivity_ratios": []}
    return {"population": 8, "top_k": 3}


@register_method("random")
def _random(preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    return [{"kind": "random"}]


# Optuna searchers start from the uniform sweep (option uniform_start): 8 of the 64 trials
# are uniform policies spread over the FLOPs budget, so the search refines a front uniform
# pruning already reaches instead of rediscovering it from random draws.
UNIFORM_START = {"quick": 2, "full": 8}


def _uniform_start(quick: bool) -> int:
    return UNIFORM_START["quick" if quick else "full"]


@register_method("tpe")
def _tpe(preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    return [{"kind": "tpe", "options": {"n_startup_trials": 4 if quick else 10, "uniform_start": _uniform_start(quick)}}]


@register_method("nsga2")
def _nsga2(preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    return [{"kind": "nsga2", "options": {"population_size": 4 if quick else 8, "uniform_start": _uniform_start(quick)}}]


@register_method("genetic")
def _genetic(preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    return [{"kind": "genetic", "options": _genetic_options(quick)}]


@register_method("masking")
def _masking(preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    return [{"kind": "masking", "options": _masking_options(preset, quick)}]


@register_method("portfolio")
def _portfolio(preset: TaskPreset, quick: bool) -> list[dict[str, Any]]:
    # TPE learns from every full-fidelity trial of the study (the GA's promoted ones and the
    # masking proposals too); NSGA-II and the GA evolve their own populations.
    return [
        {"kind": "tpe", "share": 0.4, "options": {"n_startup_trials": 4 if quick else 8,
                                                   "uniform_start": _uniform_start(quick)}},
        {"kind": "nsga2", "share": 0.2, "options": {"population_size": 4 if quick else 6}},
        {"kind": "genetic", "share": 0.3, "options": _genetic_options(quick)},
        {"kind": "masking", "share": 0.1, "options": {**_masking_options(preset, quick), "parallel": 1}},
    ]


@dataclass(frozen=True)
class BenchConfig:
    """One task's benchmark: the preset plus budget, seeds and workers."""

    task: str
    preset: TaskPreset
    seeds: tuple[int, ...] = (0, 1, 2)
    n_trials: int = 64
    workers: int = 2
    methods: tuple[str, ...] = field(default_factory=available_methods)
    cache_dir: str = str(ROOT / "studies" / "cache")
    quick: bool = False

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be distinct integers >= 0, got {self.seeds!r}")
        if isinstance(self.n_trials, bool) or not isinstance(self.n_trials, int) or self.n_trials < 2:
            raise ValueError(f"n_trials must be an integer >= 2, got {self.n_trials!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {self.workers!r}")
        unknown = [m for m in self.methods if m not in available_methods()]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r} (known: {', '.join(available_methods())})")
        if UNIFORM not in self.methods:
            raise ValueError("the uniform baseline must be among the methods (everything is compared to it)")

    @property
    def searchers(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m != UNIFORM)

    def fingerprint(self) -> dict[str, Any]:
        """What the per-study results depend on (checkpoints are reused only when it matches)."""
        return json.loads(json.dumps({
            "task": self.task, "preset": {k: v for k, v in self.preset.__dict__.items() if k != "finetune_steps"},
            "n_trials": self.n_trials, "workers": self.workers, "quick": self.quick,
            "methods": {m: _METHODS[m](self.preset, self.quick) for m in self.searchers},
        }, default=list))

    def evaluation(self, seed: int) -> dict[str, Any]:
        """The proxy evaluation settings of one seed (its calibration draw and fine-tune stream)."""
        return {"recovery": "adaptive_bn", "calibration_samples": 256, "bn_batches": 4, **self.preset.evaluation,
                "seed": seed, "threads": 1}

    def study_config(self, method: str, seed: int, storage_dir: Path) -> Any:
        """The ``StudyConfig`` of ``method``'s study for ``seed`` (journal storage in ``storage_dir``)."""
        from search.config import StudyConfig

        name = f"{self.task}-{method}-seed{seed}"
        return StudyConfig.from_dict({
            "study": {"name": name, "storage": str(storage_dir / f"{name}.journal"), "seed": seed,
                      "n_trials": self.n_trials, "objectives": ["accuracy", "flops"], "workers": self.workers,
                      "threads_per_worker": 1, "window": 2},
            "task": {"name": self.task, "options": dict(self.preset.options), "cache_dir": self.cache_dir},
            "space": {"ratio_step": 0.05, "methods": ["l1"], **self.preset.space},
            "evaluation": self.evaluation(seed),
            "constraints": {"max_flops_ratio": self.preset.max_flops_ratio},
            "searchers": _METHODS[method](self.preset, self.quick),
        })

    def finetune_settings(self, seed: int) -> dict[str, Any]:
        p = self.preset
        return {**self.evaluation(seed), "recovery": "finetune", "finetune_steps": p.finetune_steps,
                "finetune_lr": p.finetune_lr, "kd": True, "eval_samples": None}


# -- hypervolume ---------------------------------------------------------------------------------
def hypervolume(points: Iterable[tuple[float, float]], reference: Sequence[float] = REFERENCE_POINT) -> float:
    """Area dominated by ``(accuracy, flops_ratio)`` points, in (1 - accuracy, flops_ratio) up to ``reference``.

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


# -- evaluation helpers --------------------------------------------------------------------------
class SharedPool:
    """One ``EvaluatorPool`` reused by every study of a task; ``run_study`` cannot close it.

    ``run_study`` submits proposals without settings (= the study's evaluation settings),
    so the study's settings are bound here before each study.
    """

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.settings = None

    def bind(self, settings: Any) -> "SharedPool":
        self.settings = settings
        return self

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    @property
    def in_flight(self) -> int:
        return self.pool.in_flight

    def submit(self, policy: Any, tag: Any = None, settings: Any = None) -> None:
        self.pool.submit(policy, tag=tag, settings=settings if settings is not None else self.settings)

    def results(self, timeout: float | None = None) -> list:
        return self.pool.results(timeout=timeout)

    def close(self) -> None:
        """Kept open for the next study; the benchmark closes the real pool at the end."""


def evaluate_all(pool: SharedPool, jobs: Sequence[tuple[Any, Any, Any]], desc: str) -> dict[Any, Any]:
    """Evaluate ``(tag, policy, settings)`` jobs on the pool; ``{tag: Metrics}``."""
    from tqdm.auto import tqdm

    for tag, policy, settings in jobs:
        pool.submit(policy, tag=tag, settings=settings)
    out: dict[Any, Any] = {}
    with tqdm(total=len(jobs), desc=desc, file=sys.stderr, leave=False, disable=None) as bar:
        while len(out) < len(jobs):
            for tag, _policy, metrics in pool.results(timeout=60):
                out[tag] = metrics
                bar.update(1)
    return out


def uniform_ratio_for(space: Any, level: float) -> float:
    """The largest remaining ratio whose uniform policy has an exact FLOPs ratio <= ``level``."""
    lo, hi = 1e-3, 1.0
    if space.flops_ratio(space.uniform(hi)) <= level:
        return hi
    for _ in range(40):  # FLOPs are monotone in the uniform ratio; kept counts make it a step function
        mid = (lo + hi) / 2
        if space.flops_ratio(space.uniform(mid)) <= level:
            lo = mid
        else:
            hi = mid
    # A short ratio for the JSON, but never rounded up across a channel-count step.
    short = math.floor(lo * 1e6) / 1e6
    return short if space.flops_ratio(space.uniform(short)) <= level else lo


def uniform_policies(space: Any, levels: Sequence[float]) -> list[Any]:
    """The uniform sweep: the space's ratio grid plus one ratio per FLOPs level."""
    ratios = sorted(set(space.levels) | {uniform_ratio_for(space, lv) for lv in levels})
    return [space.uniform(r) for r in ratios]


# -- one task ------------------------------------------------------------------------------------
def _point(metrics: Any) -> dict[str, Any] | None:
    if metrics is None or not metrics.ok or metrics.flops_ratio is None:
        return None
    return {"accuracy": float(metrics.accuracy), "flops_ratio": float(metrics.flops_ratio)}


def _best_at(points: Sequence[dict[str, Any]], level: float) -> dict[str, Any] | None:
    """The most accurate feasible full-fidelity point with FLOPs ratio <= level (ties: fewer FLOPs)."""
    cands = [p for p in points if p["feasible"] and p["fidelity"] == "full" and p["flops_ratio"] <= level + 1e-12]
    if not cands:
        return None
    return max(cands, key=lambda p: (p["accuracy"], -p["flops_ratio"]))


def study_result(summary: Any, levels: Sequence[float]) -> dict[str, Any]:
    """Per-trial points, hypervolume (final and per trial) and best feasible accuracy per level."""
    from optuna.trial import TrialState

    points, policies = [], {}
    for r in sorted(summary.records, key=lambda r: r.number):
        if not r.evaluated:
            continue
        p = _point(r.metrics) if r.state == TrialState.COMPLETE else None
        points.append({
            "trial": r.number, "searcher": r.searcher, "fidelity": r.fidelity,
            "feasible": bool(r.feasible), "ok": p is not None,
            "accuracy": p["accuracy"] if p else None, "flops_ratio": p["flops_ratio"] if p else None,
        })
        if r.meta and r.meta.get("masking_target") is not None:  # a masking run's proposal
            points[-1]["masking_target"] = float(r.meta["masking_target"])
        if r.policy is not None:
            policies[r.number] = r.policy.to_dict()
    counted = [(p["accuracy"], p["flops_ratio"]) if p["ok"] and p["feasible"] and p["fidelity"] == "full" else None
               for p in points]
    curve = hypervolume_curve(counted)
    best = {}
    for lv in levels:
        b = _best_at([p for p in points if p["ok"]], lv)
        best[str(lv)] = None if b is None else {**b, "policy": policies.get(b["trial"])}
    return {
        "trials": len(points),
        "full_fidelity_trials": sum(p["fidelity"] == "full" for p in points),
        "feasible_full_trials": sum(c is not None for c in counted),
        "failed": sum(not p["ok"] for p in points),
        "evaluations": summary.evaluations,
        "cached": summary.cached,
        "wall_s": summary.elapsed_s,
        "driver_ms_per_trial": summary.driver_ms_per_trial,
        "hypervolume": curve[-1] if curve else 0.0,
        "hv_curve": curve,
        "best_proxy": best,
        "points": points,
    }


def uniform_result(evaluated: Sequence[tuple[Any, Any]], levels: Sequence[float], max_flops: float) -> dict[str, Any]:
    """The uniform sweep as a method: ``evaluated`` = (policy, metrics) pairs."""
    points, policies = [], {}
    for i, (policy, m) in enumerate(sorted(evaluated, key=lambda pm: max(pm[0].ratios.values()))):
        p = _point(m)
        points.append({"trial": i, "ratio": max(policy.ratios.values()), "fidelity": "full", "ok": p is not None,
                       "feasible": p is not None and p["flops_ratio"] <= max_flops + 1e-12,
                       "accuracy": p["accuracy"] if p else None, "flops_ratio": p["flops_ratio"] if p else None})
        policies[i] = policy.to_dict()
    ok = [p for p in points if p["ok"]]
    best = {}
    for lv in levels:
        b = _best_at(ok, lv)
        best[str(lv)] = None if b is None else {**b, "policy": policies[b["trial"]]}
    feasible = [(p["accuracy"], p["flops_ratio"]) for p in ok if p["feasible"]]
    return {"trials": len(points), "evaluations": len(points), "hypervolume": hypervolume(feasible),
            "best_proxy": best, "points": points}


class Checkpoint:
    """Per-study results of an unfinished run, saved after every study (``--resume`` reuses them).

    A full run takes long on a shared machine; losing it to one killed process is worse
    than one more small file. Results are reused only for the same task configuration.
    """

    def __init__(self, path: Path | None, resume: bool) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        if path is not None and resume and path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except ValueError:
                log.warning("checkpoint %s unreadable; starting afresh", path)

    def task(self, cfg: BenchConfig) -> dict[str, Any]:
        """The saved state of ``cfg``'s task (empty when none or made with another configuration)."""
        fp = cfg.fingerprint()
        saved = self.data.get(cfg.task)
        if saved is not None and saved.get("fingerprint") != fp:
            log.warning("checkpoint for %s was made with another configuration; not reused", cfg.task)
            saved = None
        if saved is None:
            saved = {"fingerprint": fp, "per_seed": {}, "elapsed_s": 0.0}
            self.data[cfg.task] = saved
        return saved

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, default=str))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


def run_task(cfg: BenchConfig, checkpoint: Checkpoint | None = None) -> dict[str, Any]:
    """Every method x seed of one task, then the equal fine-tune; raw per-seed results."""
    import torch
    from tqdm.auto import tqdm

    from evaluators.evaluate import evaluate_model
    from evaluators.pool import EvaluatorPool, ensure_ray
    from evaluators.settings import EvalSettings
    from search.runner import load_task_and_space, prepare, run_study

    torch.set_num_threads(1)
    start = time.perf_counter()
    probe = cfg.study_config(cfg.searchers[0] if cfg.searchers else "random", cfg.seeds[0], Path("."))
    t = time.perf_counter()
    task, space = load_task_and_space(probe)
    load_s = time.perf_counter() - t
    base_metrics = evaluate_model(task.base_model(), task, EvalSettings(threads=1))
    levels, max_flops = cfg.preset.levels, cfg.preset.max_flops_ratio
    info = {
        "task": cfg.task, "task_options": dict(cfg.preset.options), "load_s": load_s,
        "base_accuracy": base_metrics.accuracy, "base_mflops": space.base_cost.flops / 1e6,
        "groups": len(space.groups), "validation_samples": len(task.validation[1]),
        "train_samples": len(task.train[1]), "uniform_min_flops_ratio": space.flops_ratio(space.uniform(space.ratio_min)),
    }
    log.info("%s: base accuracy %.4f, %.1f MFLOPs, %d groups", cfg.task, base_metrics.accuracy,
             info["base_mflops"], info["groups"])

    # Ray CPUs: the pool's actors plus room for the masking searcher's training tasks, which
    # run while the actors wait for their proposals.
    ensure_ray(None, num_cpus=cfg.workers + 2)
    pool = EvaluatorPool(task, groups=space.groups, round_to=space.round_to,
                         settings=EvalSettings(**cfg.evaluation(cfg.seeds[0])), workers=cfg.workers,
                         threads_per_worker=1, window=2)
    shared = SharedPool(pool)
    checkpoint = checkpoint or Checkpoint(None, False)
    saved = checkpoint.task(cfg)
    per_seed: dict[str, dict[str, Any]] = {m: dict(saved["per_seed"].get(m, {})) for m in cfg.methods}
    previous_s = float(saved.get("elapsed_s", 0.0))
    try:
        pool.wait_ready(timeout=600)
        jobs = [(seed, m) for seed in cfg.seeds for m in cfg.methods]
        with tempfile.TemporaryDirectory(prefix="prunesearch-bench-") as tmp, \
                tqdm(total=len(jobs), desc=f"{cfg.task} studies", file=sys.stderr, disable=None) as bar:
            for seed, method in jobs:
                if str(seed) in per_seed[method]:
                    log.info("%s seed %d %s: reused from the checkpoint", cfg.task, seed, method)
                    bar.update(1)
                    continue
                settings = EvalSettings(**cfg.evaluation(seed))
                t = time.perf_counter()
                if method == UNIFORM:
                    policies = uniform_policies(space, levels)
                    got = evaluate_all(shared, [(("u", seed, i), p, settings) for i, p in enumerate(policies)],
                                       f"uniform seed {seed}")
                    res = uniform_result([(p, got[("u", seed, i)]) for i, p in enumerate(policies)], levels, max_flops)
                    res["wall_s"] = time.perf_counter() - t
                else:
                    config = cfg.study_config(method, seed, Path(tmp))
                    prepared = prepare(config, task_and_space=(task, space))
                    summary = run_study(config, prepared=prepared, progress=False,
                                        pool_factory=lambda p, _addr: shared.bind(p.config.evaluation))
                    res = study_result(summary, levels)
                per_seed[method][str(seed)] = res
                saved["per_seed"] = per_seed
                saved["elapsed_s"] = previous_s + time.perf_counter() - start
                checkpoint.save()
                log.info("%s seed %d %s: HV %.4f, best proxy %s, %.0f s", cfg.task, seed, method, res["hypervolume"],
                         {lv: round(b["accuracy"], 4) for lv, b in res["best_proxy"].items() if b},
                         time.perf_counter() - t)
                bar.set_postfix(method=method, seed=seed, hv=f"{res['hypervolume']:.3f}")
                bar.update(1)
        info["finetune_timing"] = finetune(cfg, shared, per_seed)
    finally:
        pool.close()
    info["wall_s"] = previous_s + time.perf_counter() - start  # a resumed run adds the earlier part
    if previous_s:
        info["resumed_after_s"] = previous_s
    return {**info, "per_seed": per_seed}


def finetune(cfg: BenchConfig, shared: SharedPool, per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Fine-tune every method's chosen model per seed and level identically (adds ``finetuned``); timing."""
    from evaluators.settings import EvalSettings
    from spaces.policy import Policy

    jobs, wanted = [], {}
    for method, seeds in per_seed.items():
        for seed, res in seeds.items():
            settings = EvalSettings(**cfg.finetune_settings(int(seed)))
            res["finetuned"] = {}
            for level, best in res["best_proxy"].items():
                if best is None or float(level) not in cfg.preset.tuned_levels:
                    continue
                policy = Policy.from_dict(best["policy"])
                key = (seed, policy.key())  # the same model chosen twice is fine-tuned once
                if key not in wanted:
                    wanted[key] = len(jobs)
                    jobs.append((len(jobs), policy, settings))
                res["finetuned"][level] = wanted[key]
    log.info("%s: fine-tuning %d distinct models (%d steps each)", cfg.task, len(jobs), cfg.preset.finetune_steps)
    t = time.perf_counter()
    got = evaluate_all(shared, jobs, f"{cfg.task} fine-tune")
    elapsed = time.perf_counter() - t
    for method, seeds in per_seed.items():
        for seed, res in seeds.items():
            for level, index in list(res["finetuned"].items()):
                m = got[index]
                res["finetuned"][level] = ({"accuracy": m.accuracy, "flops_ratio": m.flops_ratio,
                                            "eval_seconds": m.eval_seconds} if m.ok else {"error": m.error})
    return {"models": len(jobs), "steps": cfg.preset.finetune_steps, "wall_s": elapsed}


# -- summary -------------------------------------------------------------------------------------
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


def summarize(result: dict[str, Any], levels: Sequence[float]) -> dict[str, Any]:
    """Mean ± std over seeds; per-seed paired deltas against uniform; HV ratio to random."""
    per_seed = result["per_seed"]
    seeds = sorted(per_seed[UNIFORM], key=int)
    out: dict[str, Any] = {}
    for method, runs in per_seed.items():
        row: dict[str, Any] = {"hypervolume": _stats([runs[s]["hypervolume"] for s in seeds]),
                               "wall_s": _stats([runs[s].get("wall_s") for s in seeds]), "proxy": {}, "finetuned": {},
                               "proxy_delta": {}, "finetuned_delta": {}}
        for lv in map(str, levels):
            row["proxy"][lv] = _stats([_acc(runs[s]["best_proxy"].get(lv)) for s in seeds])
            row["finetuned"][lv] = _stats([_acc(runs[s].get("finetuned", {}).get(lv)) for s in seeds])
            for kind, key in (("proxy_delta", "best_proxy"), ("finetuned_delta", "finetuned")):
                deltas = []
                for s in seeds:
                    a = _acc(runs[s].get(key, {}).get(lv))
                    b = _acc(per_seed[UNIFORM][s].get(key, {}).get(lv))
                    deltas.append(None if a is None or b is None else a - b)
                row[kind][lv] = _stats(deltas)
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
    searchers = [m for m in summary if m != UNIFORM]
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


# -- plots ---------------------------------------------------------------------------------------
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

    task = result["task"]
    per_seed = result["per_seed"]
    methods = list(per_seed)
    seed0 = sorted(per_seed[UNIFORM], key=int)[0]
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    uni = [(p["flops_ratio"], p["accuracy"]) for p in per_seed[UNIFORM][seed0]["points"] if p["ok"]]

    cols = 4
    rows = math.ceil((len(methods) - 1) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), dpi=110, sharex=True, sharey=True,
                             squeeze=False)
    for ax, method in zip(axes.flat, [m for m in methods if m != UNIFORM]):
        pts = per_seed[method][seed0]["points"]
        full = [p for p in pts if p["ok"] and p["fidelity"] == "full"]
        cheap = [p for p in pts if p["ok"] and p["fidelity"] != "full"]
        ax.scatter([p["flops_ratio"] for p in cheap], [p["accuracy"] for p in cheap], s=10, facecolors="none",
                   edgecolors="grey", alpha=0.6, label="cheap fidelity")
        ax.scatter([p["flops_ratio"] for p in full], [p["accuracy"] for p in full], s=12, color=colours[method],
                   alpha=0.7, label="trials")
        front = _front([(p["flops_ratio"], p["accuracy"]) for p in full if p["feasible"]])
        if front:
            ax.plot(*zip(*front), "-o", color=colours[method], ms=3, lw=1.5, drawstyle="steps-post", label="front")
        ax.plot(*zip(*sorted(uni)), "--", color="black", lw=1, label="uniform")
        for lv in levels:
            ax.axvline(lv, color="grey", lw=0.6, ls=":")
        ax.axvline(max_flops, color="red", lw=0.8, ls="--")
        ax.set_title(f"{method} (HV {per_seed[method][seed0]['hypervolume']:.3f})", fontsize=9)
        ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(methods) - 1:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="lower right")
    for ax in axes[:, 0]:
        ax.set_ylabel("proxy accuracy")
    for ax in axes[-1, :]:
        ax.set_xlabel("FLOPs ratio")
    fig.suptitle(f"{task}: trials and feasible Pareto front per searcher (seed {seed0}; dashed: uniform; "
                 f"red: max FLOPs {max_flops})", fontsize=10)
    fig.tight_layout()
    pareto = out_dir / f"search_quality_{task}{suffix}_pareto.png"
    fig.savefig(pareto)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for method in methods:
        if method == UNIFORM:
            hv = [per_seed[UNIFORM][s]["hypervolume"] for s in per_seed[UNIFORM]]
            ax.axhline(statistics.fmean(hv), color="black", ls="--", lw=1, label="uniform (sweep)")
            continue
        curves = np.array([per_seed[method][s]["hv_curve"] for s in sorted(per_seed[method], key=int)], dtype=float)
        x = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(0), curves.std(0)
        ax.plot(x, mean, color=colours[method], label=method)
        ax.fill_between(x, mean - std, mean + std, color=colours[method], alpha=0.15)
    ax.set_xlabel("trials (budget spent)")
    ax.set_ylabel("hypervolume (ref. point (1, 1))")
    ax.set_title(f"{task}: hypervolume of feasible full-fidelity trials (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    hv_path = out_dir / f"search_quality_{task}{suffix}_hypervolume.png"
    fig.savefig(hv_path)
    plt.close(fig)
    return {"pareto": pareto.name, "hypervolume": hv_path.name}


# -- markdown ------------------------------------------------------------------------------------
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
        "(1 - accuracy, FLOPs ratio), reference point (1, 1). Accuracies in %, mean ± std over seeds; Δ = paired "
        "per-seed difference to uniform. The GA's cheap-fidelity trials count in its budget but not in its front.",
        "",
    ]
    for task, res in results["tasks"].items():
        if "skipped" in res:
            lines += [f"### {task}", "", f"Skipped: {res['skipped']}", ""]
            continue
        s, levels = res["summary"], res["levels"]
        lines += [f"### {task}", "",
                  f"Base model {100 * res['base_accuracy']:.1f}% ({res['validation_samples']} validation samples), "
                  f"{res['base_mflops']:.1f} MFLOPs, {res['groups']} channel groups; constraint FLOPs ratio <= "
                  f"{res['max_flops_ratio']}; proxy recovery `{res.get('proxy_recovery', '?')}`; fine-tune "
                  f"{res['finetune_steps']} steps at FLOPs levels {', '.join(f'{int(100 * lv)}%' for lv in res.get('finetune_levels', levels))}. "
                  f"Wall time {res['wall_s'] / 60:.1f} min.",
                  ""]
        head = "| method | HV | HV vs random | " + " | ".join(
            f"proxy ≤{int(100 * lv)}% | Δ | fine-tuned ≤{int(100 * lv)}% | Δ" for lv in levels) + " | s/study |"
        lines += [head, "|" + "---|" * (4 + 4 * len(levels))]
        for method, row in s.items():
            cells = [f"{row['hypervolume']['mean']:.3f} ± {row['hypervolume']['std']:.3f}"
                     if row["hypervolume"]["mean"] is not None else "—",
                     _pm(row.get("hv_vs_random"), signed=True) + ("%" if row.get("hv_vs_random") else "")]
            for lv in map(str, levels):
                cells += [_pm(row["proxy"][lv]), _pm(row["proxy_delta"][lv], signed=True) if method != UNIFORM else "",
                          _pm(row["finetuned"][lv]),
                          _pm(row["finetuned_delta"][lv], signed=True) if method != UNIFORM else ""]
            wall = row["wall_s"]["mean"]
            cells.append(f"{wall:.0f}" if wall is not None else "—")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
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
        lines += ["", f"![{task} Pareto fronts]({res['plots']['pareto']})",
                  f"![{task} hypervolume vs trials]({res['plots']['hypervolume']})", ""]
    if results["targets"]:
        lines += ["### Targets", "", "| task | target | best method | value | threshold | met |", "|---|---|---|---|---|---|"]
        for t in results["targets"]:
            value = "—" if t["value"] is None else f"{100 * t['value']:+.1f}" + (
                f" ± {100 * t['std']:.1f}" if t.get("std") else "") + (" %" if t["kind"] == "hv_vs_random" else " pts")
            thr = f"{100 * t['threshold']:+.0f}" + (" %" if t["kind"] == "hv_vs_random" else " pts")
            lines.append(f"| {t['task']} | {t['name']} | {t['best'] or '—'} | {value} | {thr} | "
                         f"{'yes' if t['met'] else '**no**'} |")
        lines.append("")
    return "\n".join(lines)


# -- entry point ---------------------------------------------------------------------------------
def resolve_task(name: str) -> str | None:
    """``None`` when ``name`` can be loaded, else why not (a built-in task may not be registered yet)."""
    from evaluators.tasks import available_tasks

    if name in available_tasks() or ":" in name:
        return None
    try:  # the shapes task registers on import of its module
        __import__("evaluators.synthetic")
    except ImportError as exc:
        return f"cannot import evaluators.synthetic: {exc}"
    return None if name in available_tasks() else f"task {name!r} is not registered"


def run(tasks: Sequence[str], *, quick: bool, seeds: Sequence[int] | None, n_trials: int | None, workers: int,
        methods: Sequence[str] | None, task_options: Mapping[str, Any], cache_dir: str,
        out_dir: Path, requested: bool, checkpoint: Checkpoint | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    results: dict[str, Any] = {"tasks": {}, "targets": []}
    config: dict[str, Any] = {"quick": quick, "workers": workers, "reference_point": list(REFERENCE_POINT),
                              "n_trials": n_trials or (QUICK["n_trials"] if quick else 64),
                              "seeds": list(seeds or (QUICK["seeds"] if quick else (0, 1, 2))),
                              "targets": TARGETS, "tasks": {}}
    suffix = "_quick" if quick else ""
    for name in tasks:
        why = resolve_task(name)
        if why is not None:
            if requested:
                raise SystemExit(f"search_quality: error: {why}")
            log.warning("skipping task %s: %s", name, why)
            results["tasks"][name] = {"skipped": why}
            continue
        preset = PRESETS.get(name, GENERIC_PRESET)
        if task_options:
            preset = replace(preset, options={**preset.options, **task_options})
        if quick:
            preset = replace(preset, finetune_steps=QUICK["finetune_steps"])
        cfg = BenchConfig(task=name, preset=preset, seeds=tuple(config["seeds"]), n_trials=config["n_trials"],
                          workers=workers, methods=tuple(methods or available_methods()), cache_dir=cache_dir,
                          quick=quick)
        res = run_task(cfg, checkpoint)
        res.update({"levels": list(preset.levels), "max_flops_ratio": preset.max_flops_ratio,
                    "finetune_steps": preset.finetune_steps, "finetune_levels": list(preset.tuned_levels),
                    "proxy_recovery": cfg.evaluation(0)["recovery"]})
        res["summary"] = summarize(res, preset.levels)
        res["masking_per_target"] = masking_per_target(res)
        res["targets"] = check_targets(name, res["summary"])
        res["plots"] = plot_task(res, out_dir, preset.levels, preset.max_flops_ratio, suffix)
        # per task, so a file merged from several runs (--merge) keeps where each came from
        res["measured"] = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git": git_commit(),
                           "machine": machine_info()}
        results["tasks"][name] = res
        results["targets"] += res["targets"]
        config["tasks"][name] = {
            "preset": {k: (list(v) if isinstance(v, tuple) else v) for k, v in preset.__dict__.items()},
            "evaluation": cfg.evaluation(0), "finetune": cfg.finetune_settings(0),
            "methods": {m: _METHODS[m](preset, quick) for m in cfg.searchers},
        }
    return results, config


def merge_previous(path: Path, results: dict[str, Any], config: dict[str, Any]) -> None:
    """Add the tasks of an earlier result file that this run did not redo (``--merge``)."""
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    old_config, old_tasks = old.get("config", {}), old.get("results", {}).get("tasks", {})
    for key in ("seeds", "n_trials", "quick"):
        if old_config.get(key) != config.get(key):
            raise SystemExit(f"search_quality: error: cannot --merge into {path}: its {key} is "
                             f"{old_config.get(key)!r}, this run's {config.get(key)!r}")
    merged = {t: r for t, r in old_tasks.items() if t not in results["tasks"]}
    if not merged:
        return
    for t, r in merged.items():  # files written before these fields existed
        r.setdefault("proxy_recovery", old_config.get("tasks", {}).get(t, {}).get("evaluation", {}).get("recovery"))
        r.setdefault("finetune_levels", r.get("levels"))
    results["tasks"] = {**merged, **results["tasks"]}
    results["targets"] = [t for r in results["tasks"].values() for t in r.get("targets", [])]
    config["tasks"] = {**{t: c for t, c in old_config.get("tasks", {}).items() if t in merged}, **config["tasks"]}
    config["merged_from"] = {t: (r.get("measured") or {"created": old.get("created"), "git": old.get("git")})
                             for t, r in merged.items()}
    config["wall_seconds"] = round(config["wall_seconds"] + sum(r.get("wall_s", 0.0) for r in merged.values()), 1)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--task", action="append", default=None,
                        help="task to benchmark (repeatable; default: digits and shapes; quick: digits)")
    parser.add_argument("--task-options", default="{}", help="JSON object of options for every --task")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    parser.add_argument("--trials", type=int, default=None, help="trials per study (default 64, quick 12)")
    parser.add_argument("--workers", type=int, default=2, help="evaluation workers (default %(default)s)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(available_methods())}")
    parser.add_argument("--cache-dir", default=str(ROOT / "studies" / "cache"), help="task model cache")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the studies an interrupted run saved in <out>/<name>.partial.json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other tasks of an existing result file (same seeds and budget) and replace "
                             "only the tasks run now")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one "study created" line per study is noise here
    try:
        task_options = json.loads(args.task_options)
        if not isinstance(task_options, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        parser.error(f"--task-options must be a JSON object: {exc}")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    if methods is not None and UNIFORM not in methods:
        methods = [UNIFORM, *methods]
    tasks = args.task or (["digits"] if args.quick else ["digits", "shapes"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    name = "search_quality_quick" if args.quick else "search_quality"
    checkpoint = Checkpoint(out / f"{name}.partial.json", args.resume)
    results, config = run(tasks, quick=args.quick, seeds=range(args.seeds) if args.seeds else None,
                          n_trials=args.trials, workers=args.workers, methods=methods, task_options=task_options,
                          cache_dir=args.cache_dir, out_dir=out, requested=args.task is not None,
                          checkpoint=checkpoint)
    config["wall_seconds"] = round(sum(r.get("wall_s", 0.0) for r in results["tasks"].values()), 1)
    if args.merge:
        merge_previous(out / f"{name}.json", results, config)
    path = write_result(name, results, config=config, out_dir=out, markdown=markdown(results, config))
    checkpoint.remove()
    print(f"wrote {path} and {out / f'{name}.md'} in {config['wall_seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
