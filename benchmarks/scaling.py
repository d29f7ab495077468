"""Scaling: evaluations/s and driver overhead of real studies at 1 and 2 workers, and trial cost vs model size.

Part 1 runs short studies through ``search.runner.run_study`` on digits (random search, and
TPE, whose ``ask`` grows with the study) with journal or SQLite (WAL) storage in a temporary
directory, on an ``EvaluatorPool`` started and warmed up beforehand (actor start-up is not
throughput). Per study: evaluations/s over the run, and the driver's CPU time per trial in
storage writes and in searchers' ask/tell (``RunSummary.driver_s``) as a share of an
evaluation's time. Target from the design: driver storage work < 5% of a trial's time.

Part 2 times one evaluation (prune -> adaptive BN -> accuracy -> cost, in-process, one
thread) of the CIFAR-style ResNet of the ``shapes`` task at three widths, with untrained
weights (timing does not depend on the weights) on generated 32x32 images, plus the
one-off channel-group discovery (``SearchSpace.from_model``).

Writes ``benchmarks/results/scaling.json`` (``scaling_quick.json`` in quick mode) and ``scaling.md``.

    python -m benchmarks.scaling            # full run
    python -m benchmarks.scaling --quick    # CI smoke run
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.common import ROOT, base_parser, setup_logging, write_and_report  # noqa: E402

log = logging.getLogger("benchmarks.scaling")

TARGETS = {"driver_storage_share_max": 0.05}
WIDTHS = ((8, 16, 32), (16, 32, 64), (32, 64, 128))
# (searcher, storage kind, workers): throughput at 1 and 2 workers; storage and searcher cost at 1.
STUDIES = (("random", "journal", 1), ("random", "journal", 2), ("random", "sqlite", 1), ("tpe", "journal", 1))


def _storage(kind: str, directory: Path, name: str) -> str:
    return str(directory / f"{name}.journal") if kind == "journal" else f"sqlite:///{directory / name}.db"


def study_config(searcher: str, storage: str, workers: int, n_trials: int, cache_dir: str, name: str) -> Any:
    from search.config import StudyConfig

    return StudyConfig.from_dict({
        "study": {"name": name, "storage": storage, "seed": 0, "n_trials": n_trials,
                  "objectives": ["accuracy", "flops"], "workers": workers, "threads_per_worker": 1, "window": 2},
        "task": {"name": "digits", "cache_dir": cache_dir},
        "space": {"ratio_min": 0.2, "methods": ["l1"]},
        "evaluation": {"recovery": "adaptive_bn", "calibration_samples": 256, "bn_batches": 4, "threads": 1},
        "constraints": {"max_flops_ratio": 0.5},
        "searchers": [{"kind": searcher}],
    })


class _KeepOpen:
    """The warmed-up pool handed to ``run_study``, which must not close it."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    def close(self) -> None:
        pass


def run_studies(n_trials: int, cache_dir: str, studies: tuple = STUDIES) -> list[dict[str, Any]]:
    """Each configuration of ``studies`` on a fresh, warmed-up pool; one row per study."""
    import numpy as np

    from evaluators.pool import EvaluatorPool, ensure_ray
    from search.runner import run_study
    from search.setup import load_task_and_space, prepare

    ensure_ray(None, num_cpus=2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="prunesearch-scaling-") as tmp:
        probe = study_config("random", _storage("journal", Path(tmp), "probe"), 1, n_trials, cache_dir, "probe")
        task, space = load_task_and_space(probe)
        warm = [space.sample(np.random.default_rng(99)) for _ in range(2)]
        for i, (searcher, kind, workers) in enumerate(studies):
            name = f"scaling-{i}-{searcher}-{kind}-w{workers}"
            config = study_config(searcher, _storage(kind, Path(tmp), name), workers, n_trials, cache_dir, name)
            prepared = prepare(config, task_and_space=(task, space))
            with EvaluatorPool(task, groups=space.groups, settings=config.evaluation, workers=workers,
                               threads_per_worker=1, window=2) as pool:
                pool.wait_ready(timeout=300)
                for j in range(workers):  # first evaluation per actor pays lazy imports
                    pool.submit(warm[j % len(warm)], tag=("warm", j))
                while pool.in_flight:
                    pool.results()
                summary = run_study(config, prepared=prepared, progress=False,
                                    pool_factory=lambda _p, _a: _KeepOpen(pool))
            evals = [r.metrics.eval_seconds for r in summary.records if r.metrics is not None and r.metrics.ok]
            eval_ms = 1000 * statistics.fmean(evals) if evals else None
            per_trial = summary.driver_ms_per_trial
            row = {
                "searcher": searcher, "storage": kind, "workers": workers, "trials": summary.new_trials,
                "evaluations": summary.evaluations, "wall_s": summary.elapsed_s,
                "evals_per_s": summary.new_trials / summary.elapsed_s,
                "eval_ms_mean": eval_ms,
                "driver_ms_per_trial": per_trial,
                "driver_storage_share": per_trial.get("storage", 0.0) / eval_ms if eval_ms else None,
                "driver_total_share": sum(per_trial.values()) / eval_ms if eval_ms else None,
            }
            log.info("%s: %.2f evals/s, driver %s ms/trial", name, row["evals_per_s"], per_trial)
            rows.append(row)
    return rows


def model_sizes(policies_per_width: int) -> list[dict[str, Any]]:
    """Per-phase cost of one evaluation of the shapes ResNet at each width in ``WIDTHS``."""
    import numpy as np
    import torch

    from evaluators.evaluate import evaluate
    from evaluators.settings import EvalSettings
    from evaluators.synthetic import build_shapes_model, generate_shapes
    from evaluators.tasks import Task
    from spaces.space import SearchSpace

    torch.set_num_threads(1)
    x, y = generate_shapes(900, seed=0, image_size=32, num_classes=12)
    settings = EvalSettings(recovery="adaptive_bn", calibration_samples=256, bn_batches=4, eval_samples=600, threads=1)
    rows = []
    for widths in WIDTHS:
        build = functools.partial(build_shapes_model, widths, 2, 12)
        torch.manual_seed(0)
        task = Task(name="shapes-untrained", build_model=build, train=(x[:300], y[:300]),
                    calibration=(x[:300], y[:300]), validation=(x[300:], y[300:]), example_inputs=x[:1].clone(),
                    num_classes=12, base_state=build().state_dict())
        base = task.base_model()
        t = time.perf_counter()
        space = SearchSpace.from_model(base, task.example_inputs, ratio_min=0.2)
        discover_s = time.perf_counter() - t
        rng = np.random.default_rng(0)
        policies = [space.sample(rng) for _ in range(policies_per_width)]
        evaluate(policies[0], task, settings, groups=space.groups, base_model=base)  # warm-up
        metrics = [evaluate(p, task, settings, groups=space.groups, base_model=base) for p in policies]
        failed = [m.error for m in metrics if not m.ok]
        if failed:
            raise RuntimeError(f"evaluation failed at widths {widths}: {failed[0]}")
        phases = sorted({k for m in metrics for k in m.timings})
        row = {
            "widths": list(widths), "mflops": space.base_cost.flops / 1e6, "params_k": space.base_cost.params / 1e3,
            "groups": len(space.groups), "discover_s": discover_s,
            "eval_s_mean": statistics.fmean(m.eval_seconds for m in metrics),
            "mean_flops_ratio": statistics.fmean(m.flops_ratio for m in metrics),
            "phase_means_s": {k: statistics.fmean(m.timings.get(k, 0.0) for m in metrics) for k in phases},
            "evaluations": len(metrics), "validation_samples": settings.eval_samples,
        }
        log.info("widths %s: %.1f MFLOPs, %.3f s/eval", widths, row["mflops"], row["eval_s_mean"])
        rows.append(row)
    return rows


def markdown(results: dict[str, Any], config: dict[str, Any]) -> str:
    lines = ["## Scaling", "",
             f"Random search / TPE studies on digits through the real runner ({config['n_trials']} trials each, "
             "adaptive-BN proxy, a warmed-up pool; journal or SQLite-WAL storage in a temp dir). Driver ms/trial = "
             "CPU time of the driver thread in storage writes and in the searcher's ask/tell; share = of the mean "
             "evaluation time.", "",
             "| searcher | storage | workers | evals/s | eval ms | driver storage ms/trial | driver searcher ms/trial "
             "| storage share |", "|---|---|---|---|---|---|---|---|"]
    for r in results["studies"]:
        d = r["driver_ms_per_trial"]
        lines.append(f"| {r['searcher']} | {r['storage']} | {r['workers']} | {r['evals_per_s']:.2f} | "
                     f"{r['eval_ms_mean']:.0f} | {d.get('storage', 0):.1f} | {d.get('searchers', 0):.1f} | "
                     f"{100 * r['driver_storage_share']:.1f}% |")
    s = results["summary"]
    by_storage = ", ".join(f"{k} {'met' if s['storage_share_target_met_by_storage'][k] else '**missed**'} "
                           f"(worst {100 * v:.1f}%)" for k, v in s["worst_storage_share_by_storage"].items())
    lines += ["", f"2 workers vs 1: x{s['speedup_2_vs_1']:.2f} evaluations/s. Driver storage share target "
              f"< {100 * TARGETS['driver_storage_share_max']:.0f}% of an evaluation: {by_storage}.",
              "", "Cost of one evaluation vs model size (shapes ResNet, untrained weights, 600 validation images, "
              "one thread):", "",
              "| widths | MFLOPs | params (k) | groups | group discovery s | s/eval | prune | adaptive BN | accuracy |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["model_sizes"]:
        p = r["phase_means_s"]
        lines.append(f"| {tuple(r['widths'])} | {r['mflops']:.1f} | {r['params_k']:.0f} | {r['groups']} | "
                     f"{r['discover_s']:.2f} | {r['eval_s_mean']:.2f} | {p.get('prune', 0):.2f} | "
                     f"{p.get('recover', 0):.2f} | {p.get('accuracy', 0):.2f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=None, help="trials per study (default 32, quick 6)")
    parser.add_argument("--cache-dir", default=str(ROOT / "studies" / "cache"), help="digits model cache")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n = args.trials or (6 if args.quick else 32)
    if n < 2:
        parser.error(f"--trials must be >= 2, got {n}")
    start = time.perf_counter()
    studies = STUDIES[:2] if args.quick else STUDIES  # quick: throughput at 1 and 2 workers only
    results: dict[str, Any] = {"studies": run_studies(n, args.cache_dir, studies),
                               "model_sizes": model_sizes(1 if args.quick else 6)}
    by = {(r["searcher"], r["storage"], r["workers"]): r for r in results["studies"]}
    worst = max(r["driver_storage_share"] for r in results["studies"] if r["driver_storage_share"] is not None)
    per_storage = {}
    for r in results["studies"]:
        if r["driver_storage_share"] is not None:
            per_storage[r["storage"]] = max(per_storage.get(r["storage"], 0.0), r["driver_storage_share"])
    results["summary"] = {
        "evals_per_s_1_worker": by[("random", "journal", 1)]["evals_per_s"],
        "evals_per_s_2_workers": by[("random", "journal", 2)]["evals_per_s"],
        "speedup_2_vs_1": by[("random", "journal", 2)]["evals_per_s"] / by[("random", "journal", 1)]["evals_per_s"],
        "worst_storage_share": worst,
        "storage_share_target_met": worst < TARGETS["driver_storage_share_max"],
        "worst_storage_share_by_storage": per_storage,
        "storage_share_target_met_by_storage": {k: v < TARGETS["driver_storage_share_max"] for k, v in per_storage.items()},
        "eval_s_by_mflops": [[r["mflops"], r["eval_s_mean"]] for r in results["model_sizes"]],
    }
    config = {"quick": args.quick, "n_trials": n, "studies": [list(s) for s in studies], "widths": [list(w) for w in WIDTHS],
              "targets": TARGETS, "wall_seconds": round(time.perf_counter() - start, 1)}
    write_and_report("scaling", args.quick, results, config=config, out_dir=args.out,
                     markdown=markdown(results, config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
