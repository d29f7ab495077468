"""Search quality: every searcher against uniform pruning at an equal budget of proxy evaluations.

For each task (default: ``digits`` and, when registered, the harder ``shapes``) and each of
three seeds, the real runner (``search.runner.run_study``, journal storage in a temporary
directory) runs one study per method with the same budget of ``n_trials`` trials (64), the
same search space, proxy evaluation, constraint and objectives ``["accuracy", "flops"]``:

* ``uniform``   — every group at one remaining ratio (Torch-Pruning, same L1 criterion, same
  recovery): the whole ratio grid plus, per reported FLOPs level, the largest continuous
  ratio whose exact FLOPs ratio (``space.flops_ratio``) is at most that level;
* ``global_magnitude``, ``global_lamp`` — Torch-Pruning global pruning without search
  (``evaluators.heuristics``), bisected to each level and to the uniform sweep's FLOPs ratios;
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

Modules: :mod:`benchmarks.quality_presets` (what is compared), :mod:`benchmarks.quality_run`
(running it), :mod:`benchmarks.quality_scores` (one study's numbers),
:mod:`benchmarks.quality_report` and :mod:`benchmarks.quality_plots` (the summary).

Writes ``benchmarks/results/search_quality.json`` (``_quick`` in quick mode), a markdown
summary next to it and, per task, ``search_quality_<task>_pareto.png`` and
``search_quality_<task>_hypervolume.png``.

    python -m benchmarks.search_quality                 # full run: digits + shapes, 3 seeds
    python -m benchmarks.search_quality --task digits   # one task
    python -m benchmarks.search_quality --quick         # CI smoke run
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.common import (  # noqa: E402
    ROOT, base_parser, git_commit, machine_info, result_name, setup_logging, write_and_report)
from benchmarks.hypervolume import REFERENCE_POINT  # noqa: E402
from benchmarks.quality_plots import plot_task  # noqa: E402
from benchmarks.quality_presets import (  # noqa: E402
    FULL, GENERIC_PRESET, PRESETS, QUICK, TARGETS, UNIFORM, BenchConfig, available_methods, default_methods)
from benchmarks.quality_report import check_targets, markdown, masking_per_target, summarize  # noqa: E402
from benchmarks.quality_run import Checkpoint, run_task  # noqa: E402
from search.masking_core import SNAPS  # noqa: E402
from search.promotion import PromotionConfig  # noqa: E402

log = logging.getLogger("benchmarks.search_quality")


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
        out_dir: Path, requested: bool, checkpoint: Checkpoint | None = None, finetune_seeds: int = 1,
        hv_points: int = 0, masking_steps: int | None = None,
        masking_snap: str | None = None,
        promotion_eta: float | None = None,
        promotion_repeats: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every task's benchmark: ``(results, config)`` as the JSON file holds them.
    ``masking_steps`` replaces every preset's (and ``--quick``'s) masking steps, ``masking_snap``
    every preset's masking snap, ``promotion_eta`` and ``promotion_repeats`` every promoted arm's
    eta and fine-tunes per rung evaluation."""
    overrides = {"masking_steps": masking_steps, "masking_snap": masking_snap,
                 "promotion_eta": promotion_eta, "promotion_repeats": promotion_repeats}
    results: dict[str, Any] = {"tasks": {}, "targets": []}
    budget = QUICK if quick else FULL
    config: dict[str, Any] = {"quick": quick, "workers": workers, "reference_point": list(REFERENCE_POINT),
                              "n_trials": n_trials or budget["n_trials"], "seeds": list(seeds or budget["seeds"]),
                              "targets": TARGETS, "tasks": {}, "finetune_seeds": finetune_seeds,
                              "hv_points": hv_points}
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
            preset = replace(preset, finetune_steps=QUICK["finetune_steps"], masking_steps=QUICK["masking_steps"])
        preset = replace(preset, **{k: v for k, v in overrides.items() if v is not None})
        cfg = BenchConfig(task=name, preset=preset, seeds=tuple(config["seeds"]), n_trials=config["n_trials"],
                          finetune_seeds=finetune_seeds, hv_points=hv_points,
                          workers=workers, methods=tuple(methods or default_methods()), cache_dir=cache_dir,
                          quick=quick)
        res = bench_task(cfg, out_dir, checkpoint)
        results["tasks"][name] = res
        results["targets"] += res["targets"]
        config["tasks"][name] = {
            "preset": {k: (list(v) if isinstance(v, tuple) else v) for k, v in preset.__dict__.items()},
            "evaluation": cfg.evaluation(0), "finetune": cfg.finetune_settings(0), "methods": cfg.method_table(),
        }
    return results, config


def bench_task(cfg: BenchConfig, out_dir: Path, checkpoint: Checkpoint | None) -> dict[str, Any]:
    """One task's raw results plus its summary, target checks and plots."""
    preset = cfg.preset
    res = run_task(cfg, checkpoint)
    res.update({"levels": list(preset.levels), "max_flops_ratio": preset.max_flops_ratio,
                "finetune_steps": preset.finetune_steps, "finetune_levels": list(preset.tuned_levels),
                "finetune_seeds": cfg.finetune_seeds,
                "proxy_recovery": cfg.evaluation(0)["recovery"]})
    res["summary"] = summarize(res, preset.levels)
    res["masking_per_target"] = masking_per_target(res)
    res["targets"] = check_targets(cfg.task, res["summary"])
    res["plots"] = plot_task(res, out_dir, preset.levels, preset.max_flops_ratio, "_quick" if cfg.quick else "")
    # per task, so a file merged from several runs (--merge) keeps where each came from
    res["measured"] = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git": git_commit(),
                       "machine": machine_info()}
    return res


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


def _parser() -> Any:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--task", action="append", default=None,
                        help="task to benchmark (repeatable; default: digits and shapes; quick: digits)")
    parser.add_argument("--task-options", default="{}", help="JSON object of options for every --task")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    parser.add_argument("--trials", type=int, default=None, help="trials per study (default 64, quick 8)")
    parser.add_argument("--workers", type=int, default=2, help="evaluation workers (default %(default)s)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of {','.join(available_methods())} (default: all but "
                             f"{','.join(sorted(set(available_methods()) - set(default_methods())))})")
    parser.add_argument("--hv-points", type=int, default=0,
                        help="fine-tune each method's best models at this many FLOPs levels up to the constraint "
                             "for a fine-tuned hypervolume (default %(default)s: none)")
    parser.add_argument("--finetune-seeds", type=int, default=1,
                        help="fine-tunes per chosen model, averaged (default %(default)s)")
    parser.add_argument("--masking-steps", type=int, default=None,
                        help="training steps of every masking run (default: the task preset's; quick: "
                             f"{QUICK['masking_steps']}; the searcher's own default is 150)")
    parser.add_argument("--masking-snap", choices=SNAPS, default=None,
                        help="how every masking run's policy meets its FLOPs target: nearest (within the "
                             "tolerance either side) or below (at most the target); default: the task preset's")
    parser.add_argument("--promotion-eta", type=float, default=None,
                        help="promoted arms promote the best 1/eta of a rung per FLOPs level (default: "
                             f"{PromotionConfig.eta:g})")
    parser.add_argument("--promotion-repeats", type=int, default=None,
                        help="fine-tunes per rung evaluation of every promoted arm, scored on their mean "
                             "(default: 1; the laddered arms' 2)")
    parser.add_argument("--cache-dir", default=str(ROOT / "studies" / "cache"), help="task model cache")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the studies an interrupted run saved in <out>/<name>.partial.json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other tasks of an existing result file (same seeds and budget) and replace "
                             "only the tasks run now")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
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
    if args.hv_points < 0:
        parser.error(f"--hv-points must be >= 0, got {args.hv_points}")
    if args.finetune_seeds < 1:
        parser.error(f"--finetune-seeds must be >= 1, got {args.finetune_seeds}")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.masking_steps is not None and args.masking_steps < 1:
        parser.error(f"--masking-steps must be >= 1, got {args.masking_steps}")
    if args.promotion_eta is not None and not args.promotion_eta > 1:
        parser.error(f"--promotion-eta must be > 1, got {args.promotion_eta:g}")
    if args.promotion_repeats is not None and args.promotion_repeats < 1:
        parser.error(f"--promotion-repeats must be >= 1, got {args.promotion_repeats}")
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    if methods is not None and UNIFORM not in methods:
        methods = [UNIFORM, *methods]
    tasks = args.task or (["digits"] if args.quick else ["digits", "shapes"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = result_name("search_quality", args.quick)
    checkpoint = Checkpoint(out / f"{name}.partial.json", args.resume)
    results, config = run(tasks, quick=args.quick, seeds=range(args.seeds) if args.seeds else None,
                          n_trials=args.trials, workers=args.workers, methods=methods, task_options=task_options,
                          cache_dir=args.cache_dir, out_dir=out, requested=args.task is not None,
                          checkpoint=checkpoint, finetune_seeds=args.finetune_seeds, hv_points=args.hv_points,
                          masking_steps=args.masking_steps, masking_snap=args.masking_snap,
                          promotion_eta=args.promotion_eta, promotion_repeats=args.promotion_repeats)
    config["wall_seconds"] = round(sum(r.get("wall_s", 0.0) for r in results["tasks"].values()), 1)
    if args.merge:
        merge_previous(out / f"{name}.json", results, config)
    write_and_report("search_quality", args.quick, results, config=config, out_dir=out,
                     markdown=markdown(results, config))
    checkpoint.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
