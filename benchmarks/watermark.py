"""What the structural watermark costs: marked vs unmarked Pareto fronts on digits.

For each seed, two studies with the same searcher, budget, recovery and seed — one with a
``[watermark]`` (every evaluated policy projected onto the key's lattice), one without —
and for FLOPs levels 0.3 and 0.5 the best feasible accuracy on each front. Target: the
marked front loses <= 0.5 points at equal FLOPs. Also reports the capacity and that every
marked Pareto model verifies (BER 0).

    python -m benchmarks.watermark            # full run (3 seeds x 48 trials)
    python -m benchmarks.watermark --quick    # CI smoke run
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, base_parser, setup_logging, write_result

LEVELS = (0.3, 0.5)


def _config(tmp: Path, name: str, seed: int, n_trials: int, key_file: Path | None) -> Any:
    from search.config import StudyConfig
    from spaces.watermark import WatermarkConfig

    config = StudyConfig.from_dict({
        "study": {"name": name, "storage": str(tmp / f"{name}.journal"), "seed": seed, "n_trials": n_trials,
                  "workers": 1, "log_file": str(tmp / f"{name}.log")},
        "task": {"name": "digits", "cache_dir": str(ROOT / "studies" / "cache")},
        "space": {"ratio_min": 0.2, "ratio_step": 0.05},
        "evaluation": {"recovery": "adaptive_bn"},
        "searchers": [{"kind": "tpe", "options": {"n_startup_trials": 8}}],
    })
    if key_file is None:
        return config
    from dataclasses import replace

    return replace(config, watermark=WatermarkConfig(key_file=str(key_file), message="(c) prunesearch benchmark",
                                                   max_shift=0.25))  # digits is small: allow more bits


def best_at(front: list[Any], level: float) -> float | None:
    accs = [r.metrics.accuracy for r in front if r.metrics.flops_ratio <= level + 1e-9]
    return max(accs) if accs else None


def run(quick: bool) -> dict[str, Any]:
    import optuna

    from search.runner import build_watermark, load_task_and_space, run_study
    from search.storage import open_storage, pareto_front, parse_storage, read_trials
    from spaces.watermark import channel_counts_from_policy, space_capacity

    seeds = [0] if quick else [0, 1, 2]
    n_trials = 10 if quick else 48
    out: dict[str, Any] = {"seeds": {}, "n_trials": n_trials, "levels": list(LEVELS)}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        key_file = tmp / "owner.key"
        key_file.write_text("benchmark-owner-key-do-not-reuse")
        space = None
        for seed in seeds:
            per: dict[str, Any] = {}
            for marked in (False, True):
                config = _config(tmp, f"{'marked' if marked else 'plain'}-{seed}", seed, n_trials,
                                 key_file if marked else None)
                if space is None:
                    _, space = load_task_and_space(config)
                    out["capacity_bits"] = space_capacity(space, _config(tmp, "c", 0, 1, key_file).watermark).total
                run_study(config, progress=False)
                study = optuna.load_study(study_name=config.name,
                                          storage=open_storage(parse_storage(config.study.storage_url)))
                front = pareto_front(read_trials(study), config.study.directions)
                entry: dict[str, Any] = {str(level): best_at(front, level) for level in LEVELS}
                entry["front_size"] = len(front)
                if marked:
                    mark = build_watermark(config, space)
                    checks = [mark.verify(channel_counts_from_policy(r.policy, space.groups, space.round_to))
                              for r in front]
                    entry["all_bits_recovered"] = all(c.ber == 0 for c in checks)
                    entry["all_verify"] = all(c.passed for c in checks)
                    entry["p_values"] = [c.p_value for c in checks]
                per["marked" if marked else "plain"] = entry
            per["cost_pts"] = {
                str(level): (None if per["plain"][str(level)] is None or per["marked"][str(level)] is None
                             else 100 * (per["plain"][str(level)] - per["marked"][str(level)]))
                for level in LEVELS
            }
            out["seeds"][seed] = per
            print(f"seed {seed}: {per}", file=sys.stderr)
    summary = {}
    for level in LEVELS:
        costs = [s["cost_pts"][str(level)] for s in out["seeds"].values() if s["cost_pts"][str(level)] is not None]
        summary[str(level)] = {
            "mean_cost_pts": statistics.mean(costs) if costs else None,
            "std_cost_pts": statistics.stdev(costs) if len(costs) > 1 else 0.0,
            "target_pts": 0.5,
            "met": bool(costs) and statistics.mean(costs) <= 0.5,
        }
    out["summary"] = summary
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    start = time.perf_counter()
    results = run(args.quick)
    name = "watermark_quick" if args.quick else "watermark"
    config = {"quick": args.quick, "task": "digits", "searcher": "tpe", "recovery": "adaptive_bn",
              "wall_seconds": round(time.perf_counter() - start, 1)}
    path = write_result(name, results, config=config, out_dir=args.out)
    print(f"wrote {path} in {config['wall_seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
