"""Headroom re-checked: a headroom run's best of top, fine-tuned on seeds its choice never saw.

``benchmarks.headroom``'s *best of top* is chosen on the fresh seeds it is scored on, so it
is optimistic: one fine-tune's seed moves a shapes model by more than the gaps between the
best candidates. This reads a headroom result (``--from``) and fine-tunes, per FLOPs level
and length, its best-of-top policy and the baselines (uniform, Torch-Pruning global
magnitude pruning) again with ``--finetune-seeds`` further seeds, the ones after the run's own
(the same recovery, lr and KD; the same task, study seed, levels and ratio range). The
difference to the better baseline on these unseen seeds is what that policy is worth.

    python -m benchmarks.headroom_recheck --from benchmarks/results/headroom/headroom.json \\
        --out benchmarks/results/headroom_recheck
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from statistics import fmean
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.common import base_parser, setup_logging, write_and_report  # noqa: E402
from benchmarks.headroom import BASELINE_NAMES, HeadroomRun, baselines, accuracy_of, setup  # noqa: E402


def read_headroom(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``(results, config)`` of a headroom result file (``ValueError``, one line, for a
    file that is missing, not JSON or not a headroom result)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--from {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"--from {path}: not a JSON file ({type(exc).__name__})") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not {"task", "levels", "steps", "seed", "finetune_seeds"} <= set(results):
        raise ValueError(f"--from {path}: not a headroom result (python -m benchmarks.headroom writes one)")
    levels = results["levels"]
    if not isinstance(levels, dict) or not levels or not all(isinstance(b, dict) and b for b in levels.values()):
        raise ValueError(f"--from {path}: its levels are not a table of rows per fine-tune length")
    for level, by_steps in levels.items():
        for steps, row in by_steps.items():
            where = f"--from {path}: level {level} steps {steps}"
            if not _confirmed_ok(row):
                raise ValueError(f"{where} has no confirmed candidates (policy and accuracies)")
            if not isinstance(row.get("best_of_top_delta"), (int, float)):
                raise ValueError(f"{where} has no best_of_top_delta")
    return results, data.get("config") or {}


def _confirmed_ok(row: Any) -> bool:
    """``row`` holds what ``best_of_top`` reads: confirmed candidates with a policy and accuracies."""
    confirmed = row.get("confirmed") if isinstance(row, dict) else None
    return isinstance(confirmed, list) and bool(confirmed) and all(
        isinstance(c, dict) and isinstance(c.get("policy"), dict) and isinstance(c.get("accuracies"), list)
        and c["accuracies"] for c in confirmed)


def best_of_top(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """The confirmed candidate with the best mean on the run's fresh seeds (its *best of top*)."""
    return max(row["confirmed"], key=lambda c: fmean(c["accuracies"]))


def recheck(source: Mapping[str, Any], config: Mapping[str, Any], finetune_seeds: int | None = None,
            workers: int = 2, cache_dir: str | None = None) -> dict[str, Any]:
    from benchmarks.quality_run import SharedPool, evaluate_all, evaluation_pool
    from evaluators.settings import EvalSettings
    from spaces.policy import Policy

    start = time.perf_counter()
    first_k = int(source["finetune_seeds"])           # the run's own fresh seeds are k = 0 .. first_k - 1
    n = finetune_seeds or first_k
    space_range = source.get("space") or {}
    spec = HeadroomRun(task=source["task"], steps=tuple(source["steps"]), seed=int(source["seed"]),
                       finetune_seeds=n, workers=workers, cache_dir=cache_dir, quick=bool(config.get("quick")),
                       levels=tuple(float(lv) for lv in source["levels"]),
                       ratio_range=(space_range["ratio_min"], space_range["ratio_max"]) if space_range else None)
    cfgs, task, space = setup(spec)
    picks = {(lv, s): best_of_top(row) for lv, by_steps in source["levels"].items() for s, row in by_steps.items()}
    bases = baselines(task, space, spec.levels)
    seeds = range(first_k, first_k + n)
    jobs = []
    for (lv, s), pick in picks.items():
        named = {"best_of_top": Policy.from_dict(pick["policy"]), **bases[float(lv)]}
        jobs += [((lv, s, name, k), p, EvalSettings(**cfgs[int(s)].finetune_settings(spec.seed, k)))
                 for name, p in named.items() for k in seeds]
    with evaluation_pool(cfgs[spec.steps[0]], task, space) as pool:
        got = evaluate_all(SharedPool(pool), jobs, f"{spec.task} recheck")
    levels: dict[str, Any] = {}
    for (lv, s), pick in picks.items():
        unseen = {name: [accuracy_of(got[(lv, s, name, k)]) for k in seeds]
                  for name in ("best_of_top", *BASELINE_NAMES)}
        means = {name: fmean(acc) for name, acc in unseen.items()}
        better = max(BASELINE_NAMES, key=means.__getitem__)
        levels.setdefault(lv, {})[s] = {
            "label": pick.get("label"), "policy": pick["policy"], "selection_accuracies": pick["accuracies"],
            "selection_delta": source["levels"][lv][s]["best_of_top_delta"], "unseen": unseen,
            "baselines": {name: means[name] for name in BASELINE_NAMES}, "better_baseline": better,
            "best_of_top": means["best_of_top"], "delta": means["best_of_top"] - means[better]}
    used = [cfgs[spec.steps[0]].finetune_settings(spec.seed, k)["seed"] for k in seeds]
    return {"task": spec.task, "seed": spec.seed, "steps": list(spec.steps), "selection_seeds": first_k,
            "finetune_seeds": n, "finetune_seed_values": used, "levels": levels, "finetunes": len(jobs),
            "wall_s": time.perf_counter() - start}


def markdown(result: Mapping[str, Any], source_path: str) -> str:
    f, n = result["selection_seeds"], result["finetune_seeds"]
    lines = [f"## Headroom re-checked on unseen seeds: {result['task']}", "",
             f"The best of top of `{source_path}`: chosen on its {f} fresh seed(s), fine-tuned again with "
             f"{n} further seed(s), as are the baselines. Δ: against the better baseline on the same seeds. "
             f"{result['finetunes']} fine-tunes, {result['wall_s'] / 60:.1f} min.", "",
             "| FLOPs <= | fine-tune steps | Δ on its selection seeds | uniform | global magnitude | best of top | "
             "Δ on unseen seeds |", "|---|---|---|---|---|---|---|"]
    for level, by_steps in result["levels"].items():
        for steps, r in by_steps.items():
            b = r["baselines"]
            lines.append(f"| {100 * float(level):g}% | {steps} | {100 * r['selection_delta']:+.1f} | "
                         f"{100 * b['uniform']:.1f} | {100 * b['global_magnitude']:.1f} | "
                         f"{100 * r['best_of_top']:.1f} | {100 * r['delta']:+.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, type=Path, help="a headroom result (headroom.json)")
    parser.add_argument("--finetune-seeds", type=int, default=None,
                        help="further fine-tune seeds (default: as many as the run's own)")
    parser.add_argument("--workers", type=int, default=2, help="evaluation workers (default %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="task model cache (default: studies/cache)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        if args.finetune_seeds is not None and args.finetune_seeds < 1:
            raise ValueError(f"--finetune-seeds must be >= 1, got {args.finetune_seeds}")
        source, config = read_headroom(args.source)
        result = recheck(source, config, args.finetune_seeds, args.workers, args.cache_dir)
    except ValueError as exc:
        parser.error(str(exc))
    run_config = {"source": str(args.source), "finetune_seeds": result["finetune_seeds"], "workers": args.workers,
                  "wall_seconds": round(result["wall_s"], 1)}
    write_and_report("headroom_recheck", bool(config.get("quick")), result, config=run_config, out_dir=args.out,
                     markdown=markdown(result, str(args.source)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
