"""Pruning methods on digits: every importance criterion x recovery at uniform 30/50/70% pruning.

Writes ``benchmarks/results/methods.json`` (machine info + commit) and ``methods.md`` (the
tables for the README) and prints the tables. Two data settings:

* **standard**: ``calibration_samples=256`` (the EvalSettings default), seed 0;
* **low data**: ``calibration_samples=64`` for importance, adaptive BN and CaP alike, over
  three calibration draws (seeds 0-2, mean and spread) — where Shapley's claim (better
  channel rankings from few samples) is tested.

Accuracy is the proxy accuracy on the whole validation split after recovery; "s/eval" is
the wall time of one ``evaluate`` call (prune + recover + measure, 1 thread). Shapley
scores depend only on (weights, calibration data, options) and are cached in-process, as
in a search: the first evaluation of each calibration draw computes them (cold, reported
separately in the cost table), the later ones reuse them. ``cap`` is CaP followed by
adaptive BN, ``cap_nobn`` CaP alone.

    python -m benchmarks.methods            # full run
    python -m benchmarks.methods --quick    # CI smoke run
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.common import ROOT, base_parser, setup_logging, write_and_report
from evaluators.evaluate import evaluate
from evaluators.importance import available_importances
from evaluators.measure import top1_accuracy
from evaluators.settings import EvalSettings
from evaluators.shapley import ShapleyImportance
from evaluators.tasks import load_task
from spaces.space import SearchSpace

PRUNED = (0.3, 0.5, 0.7)  # fraction of channels removed in every group (remaining = 1 - p)
RECOVERIES = ("none", "adaptive_bn", "cap", "cap_nobn")
LOW_DATA_RECOVERIES = ("none", "adaptive_bn", "cap")
LOW_DATA_SAMPLES = 64
LOW_DATA_SEEDS = (0, 1, 2)


def run_cell(policy, task, settings, space, base) -> dict[str, Any]:
    metrics = evaluate(policy, task, settings, groups=space.groups, base_model=base)
    if not metrics.ok:
        raise RuntimeError(f"evaluation failed: {metrics.error}")
    return {
        "accuracy": metrics.accuracy,
        "eval_seconds": metrics.eval_seconds,
        "prune_seconds": metrics.timings.get("prune"),
        "recover_seconds": metrics.timings.get("recover"),
        "flops_ratio": metrics.flops_ratio,
    }


def run(quick: bool, cache_dir: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    task = load_task("digits", cache_dir=cache_dir)
    base = task.base_model()
    space = SearchSpace.from_model(base, task.example_inputs, ratio_min=0.1)
    criteria = ("l1", "taylor", "shapley") if quick else available_importances()
    pruned = (0.5,) if quick else PRUNED
    seeds = (0,) if quick else LOW_DATA_SEEDS
    settings_for = {
        "standard": [EvalSettings(calibration_samples=256, bn_batches=4, seed=0)],
        "low_data": [EvalSettings(calibration_samples=LOW_DATA_SAMPLES, bn_batches=2, seed=s) for s in seeds],
    }
    recoveries_for = {"standard": ("adaptive_bn", "cap") if quick else RECOVERIES,
                      "low_data": ("adaptive_bn", "cap") if quick else LOW_DATA_RECOVERIES}
    jobs = [(data, settings, name, rec, p) for data, all_settings in settings_for.items() for settings in all_settings
            for name in criteria for rec in recoveries_for[data] for p in pruned]
    rows: list[dict[str, Any]] = []
    last = None
    for data, settings, name, rec, p in tqdm(jobs, desc="methods", file=sys.stderr):
        # Shapley scores depend on (weights, calibration, options) only: the first evaluation
        # of each calibration draw computes them ("cold"), later ones hit the cache as in a search.
        cold = (data, settings.seed, name) != last
        if cold:
            ShapleyImportance.clear_cache()
        last = (data, settings.seed, name)
        policy = space.uniform(round(1.0 - p, 10), name)
        cell = run_cell(policy, task, settings.replace(recovery=rec), space, base)
        rows.append({"data": data, "calibration_samples": settings.calibration_samples, "seed": settings.seed,
                     "criterion": name, "recovery": rec, "pruned": p, "cold": cold, **cell})
    return {"rows": rows, "criteria": list(criteria), "recoveries": list(recoveries_for["standard"]),
            "pruned": list(pruned), "base_accuracy": top1_accuracy(base, [task.validation]),
            "validation_samples": len(task.validation[1])}


# -- tables -------------------------------------------------------------------------------------------
def _fmt_acc(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(results: dict[str, Any], data: str) -> str:
    rows = [r for r in results["rows"] if r["data"] == data]
    if not rows:
        return ""
    pruned = results["pruned"]
    head = "| criterion | recovery | " + " | ".join(f"{int(100 * p)}% pruned" for p in pruned) + " | s/eval |"
    lines = [head, "|" + "---|" * (3 + len(pruned))]
    for name in results["criteria"]:
        for rec in results["recoveries"]:
            cells = [r for r in rows if r["criterion"] == name and r["recovery"] == rec]
            if not cells:
                continue
            accs = [_fmt_acc([r["accuracy"] for r in cells if r["pruned"] == p]) for p in pruned]
            warm = [r["eval_seconds"] for r in cells if not (r["cold"] and name == "shapley")]
            secs = f"{statistics.mean(warm):.2f}" if warm else "—"
            lines.append(f"| {name} | {rec} | " + " | ".join(accs) + f" | {secs} |")
    return "\n".join(lines)


def cost_table(results: dict[str, Any]) -> str:
    lines = ["| phase | setting | seconds (mean) |", "|---|---|---|"]
    for rec in results["recoveries"]:
        cells = [r["recover_seconds"] for r in results["rows"] if r["recovery"] == rec and r["data"] == "standard"]
        if cells:
            lines.append(f"| recover: {rec} | 256 samples | {statistics.mean(cells):.3f} |")
    for data in ("standard", "low_data"):
        for name in results["criteria"]:
            cells = [r for r in results["rows"] if r["criterion"] == name and r["data"] == data]
            cold = [r["prune_seconds"] for r in cells if r["cold"]]
            warm = [r["prune_seconds"] for r in cells if not r["cold"]]
            label = "256 samples" if data == "standard" else f"{LOW_DATA_SAMPLES} samples"
            if name == "shapley" and cold:
                lines.append(f"| prune: shapley, scores computed (cold) | {label} | {statistics.mean(cold):.2f} |")
                if warm:
                    lines.append(f"| prune: shapley, scores cached (warm) | {label} | {statistics.mean(warm):.3f} |")
            elif data == "standard" and cells:
                lines.append(f"| prune: {name} | {label} | {statistics.mean(r['prune_seconds'] for r in cells):.3f} |")
    return "\n".join(lines)


def markdown(results: dict[str, Any], config: dict[str, Any]) -> str:
    parts = [
        "## Pruning methods on digits",
        "",
        f"Uniform pruning of every channel group; proxy accuracy (%) on {results['validation_samples']} validation "
        f"samples after recovery (unpruned: {100 * results['base_accuracy']:.1f}%). s/eval: one `evaluate` call "
        "(prune + recover + measure, 1 thread); for shapley the mean over evaluations whose scores were "
        "cached, the cold cost of computing them is in the last table. "
        "`cap`: least-squares compensation then adaptive BN; `cap_nobn`: the compensation alone.",
        "",
        "### Standard calibration (256 samples)",
        "",
        table(results, "standard"),
        "",
        f"### Low data ({LOW_DATA_SAMPLES} calibration samples, mean ± sd over {len(config['low_data_seeds'])} draws)",
        "",
        table(results, "low_data"),
        "",
        "### Cost per phase",
        "",
        cost_table(results),
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=str(ROOT / "studies" / "cache"), help="digits model cache")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    start = time.perf_counter()
    results = run(args.quick, Path(args.cache_dir))
    config = {"quick": args.quick, "task": "digits", "pruned": results["pruned"],
              "low_data_samples": LOW_DATA_SAMPLES, "low_data_seeds": [0] if args.quick else list(LOW_DATA_SEEDS),
              "threads": 1, "wall_seconds": round(time.perf_counter() - start, 1)}
    write_and_report("methods", args.quick, results, config=config, out_dir=args.out,
                     markdown=markdown(results, config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
