"""Long fine-tune: the models a search-quality run chose, fine-tuned again for longer.

A search is judged by the model users keep after *their* fine-tune, which is often longer
than the benchmark's short one. This reads ``search_quality.json`` files (one task; several
files' methods are merged, so arms run at different times share one table: every run
evaluates the baselines identically, and the files must agree on them), fine-tunes each
method's chosen model at each fine-tuned FLOPs level with ``--steps`` steps (default 5x the
task preset's) — the same recovery, lr, KD, study seeds and fine-tune seeds as the short
fine-tune, on one ``EvaluatorPool`` — and reports the short and the long column side by side,
each with the paired difference to the better baseline (uniform, global pruning).

    python -m benchmarks.long_finetune --task shapes --from benchmarks/results/fill/search_quality.json \\
        --from benchmarks/results/promotion/search_quality.json --out benchmarks/results/long_finetune
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.common import base_parser, setup_logging, write_and_report  # noqa: E402
from benchmarks.quality_presets import BASELINES, GENERIC_PRESET, PRESETS, UNIFORM, BenchConfig  # noqa: E402
from benchmarks.quality_report import summarize  # noqa: E402

log = logging.getLogger("benchmarks.long_finetune")
QUICK_STEPS = 10


def merged_task(paths: Sequence[Path], task: str) -> dict[str, Any]:
    """``task``'s result from the first file, with the methods the later files add.

    Raises ``ValueError`` (one line) when a file lacks the task, its seeds differ, or its
    baselines chose other models (then the files are not comparable)."""
    merged: dict[str, Any] | None = None
    for path in paths:
        data = json.loads(path.read_text())
        res = data.get("results", {}).get("tasks", {}).get(task)
        if not res or "per_seed" not in res:
            raise ValueError(f"{path} has no results for task {task!r}")
        if merged is None:
            merged = copy.deepcopy(res)
            continue
        if sorted(res["per_seed"][UNIFORM]) != sorted(merged["per_seed"][UNIFORM]):
            raise ValueError(f"{path}: study seeds {sorted(res['per_seed'][UNIFORM])} differ from "
                             f"{sorted(merged['per_seed'][UNIFORM])}")
        for base in BASELINES:
            if base in res["per_seed"] and base in merged["per_seed"] and _chosen(res, base) != _chosen(merged, base):
                raise ValueError(f"{path}: baseline {base} chose other models than {paths[0]}; not comparable")
        for method, seeds in res["per_seed"].items():
            merged["per_seed"].setdefault(method, copy.deepcopy(seeds))
    assert merged is not None
    return merged


def _chosen(res: Mapping[str, Any], method: str) -> dict[str, Any]:
    return {s: {lv: (b or {}).get("policy") for lv, b in r["best_proxy"].items()}
            for s, r in res["per_seed"][method].items()}


def level_models_only(per_seed: Mapping[str, Any]) -> dict[str, Any]:
    """Each run's chosen models per level, without the HV models and earlier fine-tunes."""
    return {m: {s: {"best_proxy": r["best_proxy"], "hypervolume": r["hypervolume"]} for s, r in seeds.items()}
            for m, seeds in per_seed.items()}


def finetune_long(cfg: BenchConfig, per_seed: dict[str, Any]) -> dict[str, Any]:
    """``quality_run.finetune`` of ``per_seed``'s level models on a fresh pool; its timing."""
    from benchmarks.quality_run import SharedPool, finetune
    from evaluators.pool import EvaluatorPool, ensure_ray
    from evaluators.settings import EvalSettings
    from search.setup import load_task_and_space

    task, space = load_task_and_space(cfg.study_config(cfg.searchers[0], cfg.seeds[0], Path(".")))
    ensure_ray(None, num_cpus=cfg.workers)
    pool = EvaluatorPool(task, groups=space.groups, round_to=space.round_to,
                         settings=EvalSettings(**cfg.evaluation(cfg.seeds[0])), workers=cfg.workers,
                         threads_per_worker=1, window=2)
    try:
        pool.wait_ready(timeout=600)
        return finetune(cfg, SharedPool(pool), per_seed)
    finally:
        pool.close()


def columns(summary: Mapping[str, Any], level: str) -> dict[str, Any]:
    return {method: {"finetuned": row["finetuned"][level], "vs_baselines": row["finetuned_vs_baselines"][level],
                     "delta_uniform": row["finetuned_delta"][level]} for method, row in summary.items()}


def _pm(stats: Mapping[str, Any] | None, signed: bool = False) -> str:
    if not stats or stats.get("mean") is None:
        return "—"
    sign = "+" if signed else ""
    return f"{100 * stats['mean']:{sign}.1f} ± {100 * (stats.get('std') or 0.0):.1f}"


def markdown(task: str, result: Mapping[str, Any]) -> str:
    lines = [f"## Long fine-tune: {task}", "",
             f"Base {100 * result['base_accuracy']:.1f}%. The chosen models of {', '.join(result['sources'])}, "
             f"fine-tuned {result['steps_short']} steps (short, from the source files) and {result['steps_long']} "
             f"steps (long, this run), {result['finetune_seeds']} fine-tune seed(s) each, "
             f"{len(result['seeds'])} study seeds; mean ± std over study seeds; Δ = paired difference to the better "
             f"of the baselines run (uniform, global pruning). Wall time {result['wall_s'] / 60:.1f} min.", ""]
    for level, table in result["levels"].items():
        lines += [f"FLOPs <= {100 * float(level):g}%:", "",
                  "| method | fine-tuned short | Δ better baseline | fine-tuned long | Δ better baseline |",
                  "|---|---|---|---|---|"]
        for method, short in table["short"].items():
            long = table["long"][method]
            own = method in BASELINES
            lines.append(f"| {method} | {_pm(short['finetuned'])} | {'' if own else _pm(short['vs_baselines'], True)} "
                         f"| {_pm(long['finetuned'])} | {'' if own else _pm(long['vs_baselines'], True)} |")
        lines.append("")
    return "\n".join(lines)


def run(paths: Sequence[Path], task: str, steps: int | None, workers: int, cache_dir: str | None) -> dict[str, Any]:
    start = time.perf_counter()
    source = merged_task(paths, task)
    preset = PRESETS.get(task, GENERIC_PRESET)
    steps = steps or 5 * preset.finetune_steps
    seeds = tuple(sorted(int(s) for s in source["per_seed"][UNIFORM]))
    methods = tuple(source["per_seed"])
    cfg = BenchConfig(task=task, preset=replace(preset, finetune_steps=steps), seeds=seeds,
                      finetune_seeds=int(source.get("finetune_seeds", 1)), workers=workers,
                      methods=methods, **({"cache_dir": cache_dir} if cache_dir else {}))
    per_seed = level_models_only(source["per_seed"])
    timing = finetune_long(cfg, per_seed)
    short = summarize(source, preset.levels)
    long = summarize({"per_seed": per_seed}, preset.levels)
    levels = [str(lv) for lv in preset.tuned_levels]
    return {"task": task, "sources": [str(p) for p in paths], "base_accuracy": source["base_accuracy"],
            "steps_short": source.get("finetune_steps"), "steps_long": steps, "seeds": list(seeds),
            "finetune_seeds": cfg.finetune_seeds, "finetune_timing": timing,
            "levels": {lv: {"short": columns(short, lv), "long": columns(long, lv)} for lv in levels},
            "per_seed_long": {m: {s: r.get("finetuned") for s, r in runs.items()} for m, runs in per_seed.items()},
            "wall_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--from", dest="sources", action="append", required=True, type=Path,
                        help="a search_quality.json (repeatable; later files add methods)")
    parser.add_argument("--task", required=True, help="the task whose models are fine-tuned")
    parser.add_argument("--steps", type=int, default=None,
                        help="fine-tune steps (default: 5x the preset's; quick: 10)")
    parser.add_argument("--workers", type=int, default=2, help="evaluation workers (default %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="task model cache (default: studies/cache)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    for path in args.sources:
        if not path.is_file():
            parser.error(f"--from {path}: no such file")
    try:
        steps = args.steps or (QUICK_STEPS if args.quick else None)
        result = run(args.sources, args.task, steps, args.workers, args.cache_dir)
    except ValueError as exc:
        parser.error(str(exc))
    config = {"sources": [str(p) for p in args.sources], "task": args.task, "steps": result["steps_long"],
              "workers": args.workers, "wall_seconds": round(result["wall_s"], 1)}
    name = f"long_finetune_{args.task}"
    write_and_report(name, args.quick, result, config=config, out_dir=args.out,
                     markdown=markdown(args.task, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
