"""Short and long fine-tune: the models search-quality runs chose, fine-tuned for each length.

A search is judged by the model users keep after *their* fine-tune, which may be longer
than the benchmark's short one. This reads ``search_quality.json`` files (one task; several
files' methods are merged, so arms run at different times share one table: every run
evaluates the baselines identically, and the files must agree on them) and fine-tunes each
method's chosen model at every reported FLOPs level once per ``--steps`` value (default:
the task preset's fine-tune and 5x it) — the same recovery, lr, KD, study seeds and
fine-tune seeds as the search-quality fine-tune, on one ``EvaluatorPool`` — reporting each
length's column with the paired difference to the better baseline (uniform, global pruning).
At the preset's own length it repeats the search-quality fine-tune exactly (same seeds).

    python -m benchmarks.finetune_lengths --task shapes --from benchmarks/results/fill/search_quality.json \\
        --from benchmarks/results/promotion/search_quality.json --out benchmarks/results/finetune_lengths
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

from benchmarks.common import base_parser, result_name, setup_logging, write_and_report  # noqa: E402
from benchmarks.quality_presets import BASELINES, GENERIC_PRESET, PRESETS, UNIFORM, BenchConfig  # noqa: E402
from benchmarks.quality_report import summarize  # noqa: E402

log = logging.getLogger("benchmarks.finetune_lengths")
QUICK_STEPS = [5, 10]


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
    """Each run's chosen models per level, without the HV models and the source's fine-tunes."""
    return {m: {s: {"best_proxy": r["best_proxy"], "hypervolume": r["hypervolume"]} for s, r in seeds.items()}
            for m, seeds in per_seed.items()}


def finetune_columns(cfgs: Sequence[BenchConfig], per_seed: Mapping[str, Any]) -> list[tuple[dict, dict]]:
    """Per config (one fine-tune length each): ``quality_run.finetune`` of a copy of
    ``per_seed``'s level models, all on one pool; ``[(per_seed copy, timing)]``."""
    from benchmarks.quality_run import SharedPool, evaluation_pool, finetune
    from search.setup import load_task_and_space

    first = cfgs[0]
    task, space = load_task_and_space(first.study_config(first.searchers[0], first.seeds[0], Path(".")))
    out = []
    with evaluation_pool(first, task, space) as pool:
        for cfg in cfgs:
            copy_ = copy.deepcopy(dict(per_seed))
            out.append((copy_, finetune(cfg, SharedPool(pool), copy_)))
    return out


def columns(summary: Mapping[str, Any], level: str) -> dict[str, Any]:
    return {method: {"finetuned": row["finetuned"][level], "vs_baselines": row["finetuned_vs_baselines"][level],
                     "delta_uniform": row["finetuned_delta"][level]} for method, row in summary.items()}


def _pm(stats: Mapping[str, Any] | None, signed: bool = False) -> str:
    if not stats or stats.get("mean") is None:
        return "—"
    sign = "+" if signed else ""
    return f"{100 * stats['mean']:{sign}.1f} ± {100 * (stats.get('std') or 0.0):.1f}"


def markdown(task: str, result: Mapping[str, Any]) -> str:
    steps = result["steps"]
    lines = [f"## Short and long fine-tune: {task}", "",
             f"Base {100 * result['base_accuracy']:.1f}%. The models chosen in {', '.join(result['sources'])} "
             f"(each method's best proxy model per study seed and FLOPs level), fine-tuned "
             f"{' and '.join(map(str, steps))} steps, {result['finetune_seeds']} fine-tune seed(s) each (mean), "
             f"{len(result['seeds'])} study seeds; mean ± std over study seeds; Δ = paired difference to the better "
             f"of the baselines run (uniform, global pruning). Wall time {result['wall_s'] / 60:.1f} min.", ""]
    head = " | ".join(f"{s} steps | Δ better baseline" for s in steps)
    for level, table in result["levels"].items():
        lines += [f"FLOPs <= {100 * float(level):g}%:", "", f"| method | {head} |",
                  "|---|" + "---|---|" * len(steps)]
        for method in table[str(steps[0])]:
            cells = []
            for s in steps:
                col = table[str(s)][method]
                cells += [_pm(col["finetuned"]), "" if method in BASELINES else _pm(col["vs_baselines"], True)]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run(paths: Sequence[Path], task: str, steps: Sequence[int], workers: int, cache_dir: str | None,
        methods: Sequence[str] | None = None, finetune_seeds: int | None = None) -> dict[str, Any]:
    """Fine-tune the models ``paths`` chose for ``task`` at every length of ``steps``, each with
    ``finetune_seeds`` seeds (default: as many as the source run used)."""
    start = time.perf_counter()
    source = merged_task(paths, task)
    if methods is not None:
        unknown = sorted(set(methods) - set(source["per_seed"]))
        if unknown:
            raise ValueError(f"--methods: {', '.join(unknown)} not in the source files "
                             f"(they have {', '.join(source['per_seed'])})")
        source["per_seed"] = {m: r for m, r in source["per_seed"].items() if m in BASELINES or m in methods}
    preset = replace(PRESETS.get(task, GENERIC_PRESET), finetune_levels=None)   # every reported level
    seeds = tuple(sorted(int(s) for s in source["per_seed"][UNIFORM]))
    cfgs = [BenchConfig(task=task, preset=replace(preset, finetune_steps=s), seeds=seeds,
                        finetune_seeds=finetune_seeds or int(source.get("finetune_seeds", 1)), workers=workers,
                        methods=tuple(source["per_seed"]), **({"cache_dir": cache_dir} if cache_dir else {}))
            for s in steps]
    tuned = finetune_columns(cfgs, level_models_only(source["per_seed"]))
    summaries = {str(s): summarize({"per_seed": per_seed}, preset.levels) for s, (per_seed, _) in zip(steps, tuned)}
    return {"task": task, "sources": [str(p) for p in paths], "base_accuracy": source["base_accuracy"],
            "steps": list(steps), "seeds": list(seeds), "finetune_seeds": cfgs[0].finetune_seeds,
            "finetune_timing": {str(s): timing for s, (_, timing) in zip(steps, tuned)},
            "levels": {str(lv): {str(s): columns(summaries[str(s)], str(lv)) for s in steps} for lv in preset.levels},
            "per_seed": {str(s): {m: {seed: r.get("finetuned") for seed, r in runs.items()}
                                  for m, runs in per_seed.items()} for s, (per_seed, _) in zip(steps, tuned)},
            "wall_s": time.perf_counter() - start}


def tasks_in(path: Path) -> list[str]:
    """The tasks of a search-quality result file that have per-seed results."""
    tasks = json.loads(path.read_text()).get("results", {}).get("tasks", {})
    return [t for t, r in tasks.items() if isinstance(r, dict) and "per_seed" in r]


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--from", dest="sources", action="append", default=None, type=Path,
                        help="a search_quality.json (repeatable; later files add methods; default: "
                             "<out>/search_quality[_quick].json)")
    parser.add_argument("--task", default=None, help="the task whose models are fine-tuned (default: every task "
                                                     "of the first file)")
    parser.add_argument("--steps", type=int, action="append", default=None,
                        help="fine-tune steps of one column (repeatable; default: the preset's and 5x it; quick: 5, 10)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods of the source files to fine-tune (default: all; baselines always)")
    parser.add_argument("--finetune-seeds", type=int, default=None,
                        help="fine-tunes per chosen model, averaged (default: as many as the source run)")
    parser.add_argument("--workers", type=int, default=2, help="evaluation workers (default %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="task model cache (default: studies/cache)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    for steps in args.steps or ():
        if steps < 1:
            parser.error(f"--steps must be >= 1, got {steps}")
    if args.finetune_seeds is not None and args.finetune_seeds < 1:
        parser.error(f"--finetune-seeds must be >= 1, got {args.finetune_seeds}")
    sources = args.sources or [Path(args.out) / f"{result_name('search_quality', args.quick)}.json"]
    for path in sources:
        if not path.is_file():
            parser.error(f"--from {path}: no such file (run benchmarks.search_quality first)")
    for task in [args.task] if args.task else tasks_in(sources[0]):
        try:
            preset = PRESETS.get(task, GENERIC_PRESET)
            steps = args.steps or (QUICK_STEPS if args.quick else [preset.finetune_steps, 5 * preset.finetune_steps])
            methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
            result = run(sources, task, sorted(set(steps)), args.workers, args.cache_dir, methods, args.finetune_seeds)
        except ValueError as exc:
            parser.error(str(exc))
        config = {"sources": [str(p) for p in sources], "task": task, "steps": result["steps"],
                  "workers": args.workers, "wall_seconds": round(result["wall_s"], 1)}
        write_and_report(f"finetune_lengths_{task}", args.quick, result, config=config, out_dir=args.out,
                         markdown=markdown(task, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
