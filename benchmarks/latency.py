"""Latency: does the lookup table rank policies like the clock, and does optimising it pay?

Part 1 (LUT fidelity): on a ResNet-style and a MobileNet-style model (32x32 inputs,
batch 8, 1 thread), 30 random policies spanning the space (a global level in
[ratio_min, 1] plus per-group jitter) are timed for real and predicted by the table;
reported: Spearman rank correlation (target >= 0.9) and the speedup-vs-FLOPs-reduction
of each policy.

Part 2 (objective): on digits, at batch 32, for 3 seeds, NSGA-II studies with the same
budget and recovery in three arms: minimise the LUT-predicted latency, minimise the latency
measured in every evaluation (``latency_ratio``: timed alternately with the unpruned model),
and minimise FLOPs. Every study's Pareto models are timed afresh; each latency arm is
compared with the FLOPs arm at equal accuracy: at 11 accuracy levels from the common best
down 10 points, the fastest model of each front at or above the level, summarised as the
geometric mean latency ratio (below 1: the latency arm is faster). Also reported: the
fastest model of each front at one level (1 point below the common best) and the hypervolume of the measured
(error, latency ratio) front.

Part 2 first measures how much of the digits model's latency FLOPs leave unexplained
(``structure``): 30 random policies timed twice each, the noise of one timing and the
leave-one-out residual of an affine fit in the FLOPs ratio. That residual bounds what any
latency objective can gain over a FLOPs objective at equal accuracy on this machine.

    python -m benchmarks.latency            # full run
    python -m benchmarks.latency --quick    # CI smoke run
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import ROOT, base_parser, setup_logging, write_and_report
from benchmarks.hypervolume import hypervolume

BATCH = 8            # part 1 (table fidelity)
STUDY_BATCH = 32     # part 2 (objective): the batch the studies optimise and every front is timed at
ATTAINMENT_SPAN = 0.10  # part 2 compares fronts at accuracy levels down to this far below the common best
ATTAINMENT_LEVELS = 11
RETIME_ROUNDS = 16      # paired rounds when a front's models (or the structure policies) are timed


def paired_ratios(base: Any, policy: Any, example: torch.Tensor, space: Any, batch: torch.Tensor, rounds: int,
                  repeats: int = 1) -> list[float]:
    """``policy`` applied to ``base``, timed alternately with ``base`` ``repeats`` times: latency ratios."""
    from evaluators.prune import apply_policy
    from evaluators.timing import measure_paired_ms

    pruned = apply_policy(base, policy, example, groups=space.groups)
    ratios = []
    for _ in range(repeats):
        ms, ref = measure_paired_ms(pruned, base, batch, rounds=rounds)
        ratios.append(ms / ref)
    return ratios


def lut_fidelity(quick: bool, cache_dir: Path) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from evaluators.latency_table import LatencyConfig, build_latency_table, spanning_policies
    from spaces.latency import additive_latency_ms, predict_latency_ms
    from spaces.space import SearchSpace
    from tests.architectures import MobileNetV2Style, ResNetStyle

    models = {
        "resnet": lambda: ResNetStyle(widths=(32, 64, 128)),
        "mobilenetv2": lambda: MobileNetV2Style(),
    }
    n = 6 if quick else 30
    runs = 5 if quick else 12
    out: dict[str, Any] = {}
    for name, build in models.items():
        torch.manual_seed(0)
        model = build().eval()
        example = torch.randn(1, 3, 32, 32)
        space = SearchSpace.from_model(model, example, ratio_min=0.2, ratio_step=0.05)
        settings = LatencyConfig(batch=BATCH, threads=1, runs=runs, levels=(0.5,) if quick else (0.25, 0.5, 0.75),
                                   calibration=4 if quick else 16)
        start = time.perf_counter()
        table = build_latency_table(model, example, space, settings, cache_dir=cache_dir)
        build_s = time.perf_counter() - start
        batch = example.repeat(BATCH, 1, 1, 1)
        rows = []
        # Ground truth: each policy timed alternately with the base (ratio x base), as the table
        # is built; seed 1 so no test policy is one of the table's calibration policies (seed 0).
        for policy in spanning_policies(space, n, seed=1):
            (ratio,) = paired_ratios(model, policy, example, space, batch, runs)
            rows.append({
                "predicted_ms": predict_latency_ms(table, space, policy),
                "predicted_additive_ms": additive_latency_ms(table, space, policy),
                "measured_ms": ratio * table.base_ms,
                "flops_ratio": space.flops_ratio(policy),
            })
        base = table.base_ms
        for r in rows:
            r["speedup"] = base / r["measured_ms"]
            r["flops_reduction"] = 1.0 / r["flops_ratio"]
        measured = [r["measured_ms"] for r in rows]
        rho = spearmanr([r["predicted_ms"] for r in rows], measured).statistic
        rho_additive = spearmanr([r["predicted_additive_ms"] for r in rows], measured).statistic
        rho_flops = spearmanr([r["flops_ratio"] for r in rows], measured).statistic
        out[name] = {"groups": len(space.groups), "policies": rows, "spearman": float(rho),
                     "predictor": table.predictor, "coefficients": dict(table.coefficients),
                     "spearman_additive_lut": float(rho_additive), "spearman_flops": float(rho_flops),
                     "base_ms": base, "table_build_s": build_s, "target": 0.9, "met": bool(rho >= 0.9)}
        print(f"{name}: spearman {rho:.3f} ({table.predictor}; additive LUT {rho_additive:.3f}, FLOPs "
              f"{rho_flops:.3f}) over {n} policies (table built in {build_s:.1f} s)", file=sys.stderr)
    return out


def _loo_residual_sd(features: np.ndarray, target: np.ndarray) -> float:
    """SD of leave-one-out residuals of a least-squares fit (an intercept column included)."""
    x = np.hstack([np.ones((len(target), 1)), features])
    errors = []
    for i in range(len(target)):
        keep = np.arange(len(target)) != i
        coef, *_ = np.linalg.lstsq(x[keep], target[keep], rcond=None)
        errors.append(target[i] - x[i] @ coef)
    return float(np.std(errors))


def latency_structure(task: Any, space: Any, quick: bool) -> dict[str, Any]:
    """How much of the study model's latency FLOPs do not explain: the most a latency objective can gain.

    Random policies spanning the space are each timed twice (paired with the base, at the
    studies' batch). Reported: the measurement noise of one timing, and the leave-one-out
    residual SD of the latency ratio under an affine fit in the FLOPs ratio and under an
    affine fit in the per-group ratios. What FLOPs leave unexplained, above the noise, is the
    room a latency objective has over a FLOPs objective at equal accuracy.
    """
    from evaluators.latency_table import spanning_policies

    base = task.base_model()
    batch = task.example_inputs.repeat(STUDY_BATCH, 1, 1, 1)
    policies = spanning_policies(space, 8 if quick else 30, seed=2)
    flops, groups, first, second = [], [], [], []
    for policy in policies:
        a, b = paired_ratios(base, policy, task.example_inputs, space, batch, RETIME_ROUNDS, repeats=2)
        first.append(a)
        second.append(b)
        kept = space.kept(policy)
        flops.append(space.flops_ratio(policy))
        groups.append([kept[g.name] / g.channels for g in space.groups])
    latency = (np.array(first) + np.array(second)) / 2
    noise = float(np.std(np.array(first) - np.array(second)) / np.sqrt(2))  # one timing
    flops_residual = _loo_residual_sd(np.array(flops)[:, None], latency)
    out = {
        "policies": len(policies), "batch": STUDY_BATCH, "rounds": RETIME_ROUNDS,
        "latency_ratio_range": [float(latency.min()), float(latency.max())],
        "noise_sd_one_timing": noise,
        "residual_sd_affine_in_flops": flops_residual,
        "residual_sd_affine_in_group_ratios": _loo_residual_sd(np.array(groups), latency),
        "beyond_flops_sd": float(np.sqrt(max(flops_residual ** 2 - noise ** 2 / 2, 0.0))),
    }
    print(f"latency structure (digits, batch {STUDY_BATCH}): latency ratio {out['latency_ratio_range'][0]:.2f}-"
          f"{out['latency_ratio_range'][1]:.2f}; residual SD after FLOPs {flops_residual:.3f} (per-group ratios "
          f"{out['residual_sd_affine_in_group_ratios']:.3f}), one timing's noise {noise:.3f}", file=sys.stderr)
    return out


# Study arms of part 2: objective and how latency is known during the search.
ARMS: dict[str, dict[str, Any]] = {
    "latency_table": {"objective": "latency_ms", "latency": {"table": True}},
    "latency_measured": {"objective": "latency_ratio", "latency": {"table": False, "runs": 12},
                         "evaluation": {"measure_latency": True}},
    "flops": {"objective": "flops", "latency": {"table": True}},
}
LATENCY_ARMS = ("latency_table", "latency_measured")


def _study_config(tmp: Path, name: str, arm: str, seed: int, n_trials: int) -> Any:
    from search.config import StudyConfig

    spec = ARMS[arm]
    return StudyConfig.from_dict({
        "study": {"name": name, "storage": str(tmp / f"{name}.journal"), "seed": seed, "n_trials": n_trials,
                  "objectives": ["accuracy", spec["objective"]], "workers": 1, "log_file": str(tmp / f"{name}.log")},
        "task": {"name": "digits", "cache_dir": str(ROOT / "studies" / "cache")},
        "space": {"ratio_min": 0.2, "ratio_step": 0.05},
        "evaluation": {"recovery": "adaptive_bn", **spec.get("evaluation", {})},
        "latency": {"batch": STUDY_BATCH, "runs": 10, **spec["latency"]},
        "searchers": [{"kind": "nsga2", "options": {"population_size": 8}}],
    })


def _measured_front(front: list[Any], task: Any, space: Any, base_ms: float) -> list[dict[str, Any]]:
    """Each Pareto model timed alternately with the base: drifts cancel in the ratio, and one
    common ``base_ms`` keeps every study's fronts comparable."""
    base = task.base_model()
    batch = task.example_inputs.repeat(STUDY_BATCH, 1, 1, 1)
    models = []
    for r in front:
        (ratio,) = paired_ratios(base, r.policy, task.example_inputs, space, batch, RETIME_ROUNDS)
        ms = ratio * base_ms
        models.append({"accuracy": r.metrics.accuracy, "flops_ratio": r.metrics.flops_ratio,
                       "measured_ms": ms, "speedup": base_ms / ms, "latency_ratio": ms / base_ms,
                       "flops_reduction": 1.0 / r.metrics.flops_ratio})
    return models


def _fastest_at(front: list[dict[str, Any]], level: float) -> float | None:
    ok = [m["measured_ms"] for m in front if m["accuracy"] >= level]
    return min(ok) if ok else None


def attainment_ratio(front: list[dict[str, Any]], reference: list[dict[str, Any]],
                     span: float = ATTAINMENT_SPAN, levels: int = ATTAINMENT_LEVELS) -> dict[str, Any]:
    """Latency of ``front`` relative to ``reference`` at equal accuracy, over a range of accuracies.

    At each of ``levels`` accuracy levels from the common best (the lower of the two fronts'
    best accuracies) down to ``span`` below it, each front's fastest model at or above the
    level is taken; the result is the geometric mean of the ratio of their latencies (below
    1: ``front`` is faster at equal accuracy). A single level would turn on whichever single
    model each search happened to find near its top.
    """
    top = min(max(m["accuracy"] for m in f) for f in (front, reference))
    grid = [top - span * i / (levels - 1) for i in range(levels)]
    ratios = [_fastest_at(front, a) / _fastest_at(reference, a) for a in grid]
    return {"levels": grid, "ratios": ratios, "geometric_mean": float(np.exp(np.mean(np.log(ratios))))}


def objective_comparison(quick: bool) -> dict[str, Any]:
    """Each latency arm against the FLOPs arm, same seed, budget, searcher and recovery."""
    from search.records import pareto_front
    from search.runner import run_study
    from search.setup import load_task_and_space
    from search.storage import load_records
    from evaluators.timing import measure_latency_ms

    seeds = [0] if quick else [0, 1, 2]
    n_trials = 8 if quick else 40
    out: dict[str, Any] = {"seeds": {}, "n_trials": n_trials, "arms": ARMS}
    task, space, base_ms = None, None, None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for seed in seeds:
            per_seed: dict[str, Any] = {}
            for arm in ARMS:
                config = _study_config(tmp, f"{arm}-{seed}", arm, seed, n_trials)
                if task is None:
                    task, space = load_task_and_space(config)
                    out["structure"] = latency_structure(task, space, quick)
                    base_ms = measure_latency_ms(task.base_model(), task.example_inputs.repeat(STUDY_BATCH, 1, 1, 1),
                                                 runs=50, statistic="min")
                start = time.perf_counter()
                run_study(config, progress=False)
                study_s = time.perf_counter() - start
                front = _measured_front(pareto_front(load_records(config), config.study.directions), task, space, base_ms)
                per_seed[arm] = {"front": front, "base_ms": base_ms, "study_seconds": study_s}
                per_seed[arm]["measured_hypervolume"] = _measured_hypervolume(per_seed[arm])
            for arm in LATENCY_ARMS:  # at a common accuracy level: the worse best of the pair, minus 1 pt
                pair = (per_seed[arm]["front"], per_seed["flops"]["front"])
                level = min(max(m["accuracy"] for m in f) for f in pair) - 0.01
                lat, flo = (_fastest_at(f, level) for f in pair)
                per_seed[arm]["vs_flops"] = {"accuracy_level": level, "fastest_ms": lat, "flops_fastest_ms": flo,
                                             "faster": bool(lat is not None and flo is not None and lat < flo)}
                per_seed[arm]["attainment_vs_flops"] = attainment_ratio(*pair)
                print(f"seed {seed} {arm}: latency / flops study at equal accuracy (geometric mean over the top "
                      f"{ATTAINMENT_SPAN:.0%}) {per_seed[arm]['attainment_vs_flops']['geometric_mean']:.3f}; "
                      f"at accuracy >= {level:.3f}: {lat} ms vs flops study {flo} ms; HV "
                      f"{per_seed[arm]['measured_hypervolume']:.3f} vs {per_seed['flops']['measured_hypervolume']:.3f}",
                      file=sys.stderr)
            out["seeds"][seed] = per_seed
    out["summary"] = {arm: _arm_summary(out["seeds"], arm) for arm in LATENCY_ARMS}
    return out


def _arm_summary(seeds: dict[Any, Any], arm: str) -> dict[str, Any]:
    vs = [s[arm]["vs_flops"] for s in seeds.values()]
    ratios = [v["fastest_ms"] / v["flops_fastest_ms"] for v in vs if v["fastest_ms"] and v["flops_fastest_ms"]]
    hv = [(s[arm]["measured_hypervolume"], s["flops"]["measured_hypervolume"]) for s in seeds.values()]
    attainment = [s[arm]["attainment_vs_flops"]["geometric_mean"] for s in seeds.values()]
    return {"latency_ratio_to_flops_study_at_equal_accuracy": attainment,
            "mean_latency_ratio_at_equal_accuracy": statistics.mean(attainment),
            "sd_over_seeds": statistics.stdev(attainment) if len(attainment) > 1 else None,
            "faster_over_accuracy_range_in": f"{sum(a < 1 for a in attainment)}/{len(attainment)} seeds",
            "faster_at_equal_accuracy_in": f"{sum(v['faster'] for v in vs)}/{len(vs)} seeds",
            "mean_fastest_ratio_to_flops_study": statistics.mean(ratios) if ratios else None,
            "measured_hypervolume": [a for a, _ in hv],
            "measured_hypervolume_flops_study": [b for _, b in hv],
            "higher_hypervolume_in": f"{sum(a > b for a, b in hv)}/{len(hv)} seeds",
            "study_seconds": [s[arm]["study_seconds"] for s in seeds.values()],
            "flops_study_seconds": [s["flops"]["study_seconds"] for s in seeds.values()]}


def _measured_hypervolume(study: dict[str, Any]) -> float:
    """Hypervolume of a front in (error, measured latency / base latency), reference (1, 1)."""
    return hypervolume([(m["accuracy"], m["measured_ms"] / study["base_ms"]) for m in study["front"]])


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, name in zip(axes[:2], ("resnet", "mobilenetv2")):
        rows = results["lut"][name]["policies"]
        ax.scatter([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows], s=14)
        ax.set_title(f"{name}: LUT vs measured (rho={results['lut'][name]['spearman']:.2f})")
        ax.set_xlabel("predicted ms (batch 8)")
        ax.set_ylabel("measured ms")
    ax = axes[2]
    for name, marker in (("resnet", "o"), ("mobilenetv2", "s")):
        rows = results["lut"][name]["policies"]
        ax.scatter([r["flops_reduction"] for r in rows], [r["speedup"] for r in rows], marker=marker, s=14, label=name)
    lim = max(r["flops_reduction"] for n in ("resnet", "mobilenetv2") for r in results["lut"][n]["policies"])
    ax.plot([1, lim], [1, lim], "k--", lw=0.8, label="speedup = FLOPs reduction")
    ax.set_xlabel("FLOPs reduction (x)")
    ax.set_ylabel("measured speedup (x)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        results = {"lut": lut_fidelity(args.quick, Path(cache))}
    results["objective"] = objective_comparison(args.quick)
    config = {"quick": args.quick, "batch": BATCH, "study_batch": STUDY_BATCH, "threads": 1,
              "wall_seconds": round(time.perf_counter() - start, 1)}
    path = write_and_report("latency", args.quick, results, config=config, out_dir=args.out)
    plot(results, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
