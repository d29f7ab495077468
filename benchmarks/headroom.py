"""Headroom: how far the best allocation in a task's space beats uniform pruning after fine-tuning.

A searcher can only beat uniform pruning after fine-tuning if some policy in its space does.
Per reported FLOPs level (``--levels``), this draws ``--candidates`` policies from the task
preset's space, or another ratio range (``--ratio-range``), half over the whole range and
half near the uniform policy, scales each to the level
(the same projection as ``[fill]``), and fine-tunes each once with the study seed: a
*screen*, what a promotion rung of that length sees. ``--draw extremes`` screens instead the
corners a random draw rarely reaches: every group alone at the range's bottom (a residual
block all but removed), then alone at its top (a residual stream kept whole), the other
groups at one common ratio solved to the level. The screen's ``--top`` candidates are
then fine-tuned again with ``--finetune-seeds`` fresh seeds, as are the baselines (uniform,
Torch-Pruning global magnitude pruning): the same recovery, lr, KD and seeds as the
search-quality fine-tune. ``--criteria`` adds the uniform policy with each named importance
criterion as a further row (``uniform_<criterion>``), fine-tuned with the same fresh seeds:
the headroom a search over ``[space] methods`` has, since every candidate and baseline
otherwise uses the space's first criterion (or L2, global pruning's).

- *screen pick*: the screen's best candidate scored on the fresh seeds — what a search that
  fine-tuned every candidate once and kept the best would hand the user (no selection bias).
- *best of top*: the best of the top candidates on the fresh seeds — optimistic, since it is
  selected on the seeds it is scored on.

Both are upper bounds on what a searcher ranking by a cheaper proxy finds among as many
candidates. One study seed: the headroom is a property of the task and space, not of a run.

    python -m benchmarks.headroom --task shapes --out benchmarks/results/headroom
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.common import base_parser, setup_logging, write_and_report  # noqa: E402
from benchmarks.quality_presets import GENERIC_PRESET, PRESETS, BenchConfig  # noqa: E402

log = logging.getLogger("benchmarks.headroom")
BASELINE_NAMES = ("uniform", "global_magnitude")
QUICK = {"task": "digits", "candidates": 3, "top": 1, "finetune_seeds": 1, "steps": [5, 10]}
_SHRINK = 0.9   # a draw above the level is shrunk by this factor until it is within it


@dataclass(frozen=True)
class HeadroomRun:
    """One headroom measurement: the task, what is drawn and screened, what is re-fine-tuned.
    ``ValueError`` (one line, in the command line's words) for settings that cannot run."""

    task: str
    steps: tuple[int, ...]               # fine-tune lengths, one column each
    candidates: int = 24                 # policies screened per level
    top: int = 3                         # screened policies re-fine-tuned
    finetune_seeds: int = 3
    seed: int = 0                        # study seed: candidate draws and the screen
    workers: int = 2
    cache_dir: str | None = None
    quick: bool = False
    levels: tuple[float, ...] | None = None          # default: the preset's
    ratio_range: tuple[float, float] | None = None   # default: the preset's space
    criteria: tuple[str, ...] = ()                    # uniform policies with these criteria, as extra rows
    draw: str = "random"                              # a key of DRAWS: how the screened policies are chosen

    def __post_init__(self) -> None:
        for name, value, low in (("--candidates", self.candidates, 1), ("--top", self.top, 1),
                                 ("--finetune-seeds", self.finetune_seeds, 1), ("--steps", min(self.steps), 1),
                                 ("--seed", self.seed, 0), ("--workers", self.workers, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if self.draw not in DRAWS:
            raise ValueError(f"--draw {self.draw!r} is not a draw (known: {', '.join(DRAWS)})")
        if self.draw == "random" and self.top > self.candidates:
            raise ValueError(f"--top {self.top} is more than --candidates {self.candidates}")
        if self.levels and any(not 0.0 < lv <= 1.0 for lv in self.levels):
            raise ValueError(f"--levels must be FLOPs ratios in (0, 1], got {' '.join(map(str, self.levels))}")
        if self.ratio_range and not 0.0 < self.ratio_range[0] < self.ratio_range[1] <= 1.0:
            raise ValueError(f"--ratio-range must be 0 < MIN < MAX <= 1, got {' '.join(map(str, self.ratio_range))}")
        from evaluators.importance import available_importances
        from evaluators.tasks import available_tasks

        unknown = [c for c in self.criteria if c not in available_importances()]
        if unknown:
            raise ValueError(f"--criteria {unknown[0]!r} is not an importance criterion "
                             f"(known: {', '.join(available_importances())})")
        if self.task not in available_tasks():
            raise ValueError(f"--task {self.task!r} is not a task (known: {', '.join(available_tasks())})")


def _check_level(space: Any, level: float) -> None:
    if space.min_flops_ratio > level + 1e-12:
        raise ValueError(f"FLOPs level {level:g} is below the space's smallest model ({space.min_flops_ratio:.4f})")


def at_level(space: Any, policy: Any, level: float) -> Any:
    """``policy`` scaled to FLOPs ratio ``level``: shrunk (ratios floored at ``ratio_min``)
    while above it, then grown by ``spaces.fill.BudgetFill`` up to it.

    Raises ``ValueError`` when even every group at ``ratio_min`` is above the level."""
    from spaces.fill import BudgetFill
    from spaces.policy import Policy

    _check_level(space, level)
    while space.flops_ratio(policy) > level + 1e-12:
        policy = Policy(ratios={n: max(space.ratio_min, r * _SHRINK) for n, r in policy.ratios.items()},
                        method=policy.method, recovery=policy.recovery)
    return BudgetFill(space, (level,)).project(policy)


def candidates(space: Any, level: float, n: int, seed: int, spread: float = 0.35) -> list[Any]:
    """``n`` distinct policies at ``level``: even draws uniform over the space's ratio range,
    odd draws the uniform policy with each ratio multiplied by ``exp(N(0, spread))``."""
    import numpy as np

    from spaces.policy import Policy

    rng = np.random.default_rng(seed)
    names, method = space.group_names, space.methods[0]
    centre = min(space.ratio_max, max(space.ratio_min, space.uniform_ratio_within(level)))
    out: dict[str, Any] = {}
    for i in range(50 * n):   # duplicates are rare; the bound only stops a degenerate space
        if len(out) == n:
            break
        if i % 2 == 0:
            draw = rng.uniform(space.ratio_min, space.ratio_max, size=len(names))
        else:
            draw = np.clip(centre * np.exp(rng.normal(0.0, spread, size=len(names))), space.ratio_min, space.ratio_max)
        policy = at_level(space, Policy(ratios=dict(zip(names, map(float, draw))), method=method), level)
        out.setdefault(policy.key(), policy)
    return list(out.values())


def solved(space: Any, fixed: Mapping[str, float], level: float) -> Any:
    """The policy with ``fixed`` ratios and every other group at the largest common ratio in
    the space's range whose FLOPs ratio stays within ``level``; None when even that range's
    bottom is above it."""
    from spaces.policy import Policy

    def policy(common: float) -> Any:
        return Policy(ratios={n: fixed.get(n, common) for n in space.group_names}, method=space.methods[0])

    lo, hi = space.ratio_min, space.ratio_max
    if space.flops_ratio(policy(lo)) > level + 1e-12:
        return None
    if space.flops_ratio(policy(hi)) <= level + 1e-12:
        return policy(hi)
    for _ in range(40):   # channel rounding makes the FLOPs a step function of the ratio
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if space.flops_ratio(policy(mid)) <= level + 1e-12 else (lo, mid)
    return policy(lo)


def extremes(space: Any, level: float) -> list[tuple[str, Any]]:
    """``(label, policy)`` per group alone at the space's smallest ratio, then per group alone
    at its largest, the others solved to ``level`` (``solved``); a corner that cannot be within
    the level, or that repeats an earlier one, is left out. ``ValueError`` as ``at_level``."""
    _check_level(space, level)
    out: dict[str, tuple[str, Any]] = {}
    for ratio in (space.ratio_min, space.ratio_max):
        for name in space.group_names:
            policy = solved(space, {name: ratio}, level)
            if policy is not None:
                out.setdefault(policy.key(), (f"{name} at {ratio:g}", policy))
    return list(out.values())


def _random_draw(space: Any, level: float, n: int, seed: int) -> list[tuple[str, Any]]:
    return [(f"draw {i}", p) for i, p in enumerate(candidates(space, level, n, seed))]


# How a screen's policies are chosen: (space, level, candidates, seed) -> [(label, policy)].
DRAWS = {"random": _random_draw, "extremes": lambda space, level, _n, _seed: extremes(space, level)}


def baselines(task: Any, space: Any, levels: Sequence[float], criteria: Sequence[str] = ()) -> dict[float, dict[str, Any]]:
    """The baseline policies at each level: uniform (largest ratio within it) and global
    magnitude (one ranking of the base model's channels for every level), then the uniform
    policy with each of ``criteria`` as ``uniform_<criterion>``."""
    from benchmarks.quality_run import global_space
    from evaluators.heuristics import heuristic_policies

    magnitude = heuristic_policies("global_magnitude", global_space(space), levels, model=task.base_model(),
                                   example_inputs=task.example_inputs, on_grid=False)
    ratios = {lv: space.uniform_ratio_within(lv) for lv in levels}
    return {lv: {"uniform": space.uniform(ratios[lv]), "global_magnitude": p,
                 **{f"uniform_{c}": space.uniform(ratios[lv], method=c) for c in criteria}}
            for lv, p in zip(levels, magnitude)}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarize(screen: Sequence[Mapping[str, Any]], confirmed: Sequence[Mapping[str, Any]],
              base: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """One level and length: the baselines' means, the screen pick and the best of the top,
    each against the better of uniform and global magnitude pruning (``confirmed`` in screen
    order, best first); any other row of ``base`` (a criterion's uniform policy) is compared
    with the same baseline in ``criteria_delta``."""
    means = {name: _mean(acc) for name, acc in base.items()}
    better = max(BASELINE_NAMES, key=means.__getitem__)
    pick = confirmed[0]
    best = max(confirmed, key=lambda c: _mean(c["accuracies"]))
    return {"baselines": means, "better_baseline": better,
            "screen_pick": _mean(pick["accuracies"]), "screen_pick_delta": _mean(pick["accuracies"]) - means[better],
            "best_of_top": _mean(best["accuracies"]), "best_of_top_delta": _mean(best["accuracies"]) - means[better],
            "screen_max": max(s["accuracy"] for s in screen),
            "screen_above_better_baseline": sum(s["accuracy"] > means[better] for s in screen) / len(screen),
            "criteria_delta": {name: m - means[better] for name, m in means.items() if name not in BASELINE_NAMES}}


def setup(spec: HeadroomRun) -> tuple[dict[int, BenchConfig], Any, Any]:
    """The fine-tune configuration of each of ``spec.steps`` (the task preset with its levels
    and ratio range), the task and its space (with ``spec.criteria`` after its own criterion)."""
    from search.setup import load_task_and_space

    preset = PRESETS.get(spec.task, GENERIC_PRESET)
    if spec.levels:
        preset = replace(preset, levels=tuple(spec.levels), finetune_levels=None,
                         max_flops_ratio=max(preset.max_flops_ratio, *spec.levels))
    if spec.ratio_range:
        preset = replace(preset, space={**preset.space, "ratio_min": spec.ratio_range[0],
                                        "ratio_max": spec.ratio_range[1]})
    extra = {"cache_dir": spec.cache_dir} if spec.cache_dir else {}
    cfgs = {s: BenchConfig(task=spec.task, preset=replace(preset, finetune_steps=s), seeds=(spec.seed,),
                           quick=spec.quick, finetune_seeds=spec.finetune_seeds, workers=spec.workers,
                           methods=("uniform",), **extra)
            for s in spec.steps}
    task, space = load_task_and_space(cfgs[spec.steps[0]].study_config("random", spec.seed, Path(".")))
    if spec.criteria:   # the space's own criterion stays first: candidates and uniform use it
        space = space.with_config(methods=tuple(dict.fromkeys((*space.methods, *spec.criteria))))
    return cfgs, task, space


def run(spec: HeadroomRun) -> dict[str, Any]:
    from benchmarks.quality_run import SharedPool, base_accuracy, evaluate_all, evaluation_pool
    from evaluators.settings import EvalSettings

    start = time.perf_counter()
    task_name, steps, seed, finetune_seeds = spec.task, spec.steps, spec.seed, spec.finetune_seeds
    cfgs, task, space = setup(spec)
    first, preset = cfgs[steps[0]], cfgs[steps[0]].preset
    drawn = {lv: DRAWS[spec.draw](space, lv, spec.candidates, seed + int(1000 * lv)) for lv in preset.levels}
    labels = {lv: [label for label, _ in d] for lv, d in drawn.items()}
    pools = {lv: [p for _, p in d] for lv, d in drawn.items()}
    bases = baselines(task, space, preset.levels, spec.criteria)

    def screen_settings(s: int) -> EvalSettings:   # a promotion rung's fine-tune: the study seed
        return EvalSettings(**{**cfgs[s].finetune_settings(seed, 0), "seed": seed})

    with evaluation_pool(first, task, space) as pool:
        shared = SharedPool(pool)
        jobs = [(("screen", lv, s, i), p, screen_settings(s))
                for lv, pols in pools.items() for s in steps for i, p in enumerate(pols)]
        jobs += [(("base", lv, s, name, k), p, EvalSettings(**cfgs[s].finetune_settings(seed, k)))
                 for lv, named in bases.items() for s in steps for name, p in named.items() for k in range(finetune_seeds)]
        got = evaluate_all(shared, jobs, f"{task_name} screen")
        ranked = {(lv, s): sorted(range(len(pools[lv])),
                                  key=lambda i: -accuracy_of(got[("screen", lv, s, i)]))[:spec.top]
                  for lv in pools for s in steps}
        fresh = [(("top", lv, s, i, k), pools[lv][i], EvalSettings(**cfgs[s].finetune_settings(seed, k)))
                 for (lv, s), idx in ranked.items() for i in idx for k in range(finetune_seeds)]
        got.update(evaluate_all(shared, fresh, f"{task_name} confirm"))
    levels: dict[str, Any] = {}
    for lv, pols in pools.items():
        for s in steps:
            screen = [{"label": labels[lv][i], "policy": p.to_dict(),
                       "flops_ratio": got[("screen", lv, s, i)].flops_ratio,
                       "accuracy": accuracy_of(got[("screen", lv, s, i)])} for i, p in enumerate(pols)]
            confirmed = [{**screen[i], "screen": screen[i]["accuracy"],
                          "accuracies": [accuracy_of(got[("top", lv, s, i, k)]) for k in range(finetune_seeds)]}
                         for i in ranked[(lv, s)]]
            base = {name: [accuracy_of(got[("base", lv, s, name, k)]) for k in range(finetune_seeds)] for name in bases[lv]}
            levels.setdefault(str(lv), {})[str(s)] = {
                **summarize(screen, confirmed, base), "baseline_runs": base,
                "baseline_flops": {name: got[("base", lv, s, name, 0)].flops_ratio for name in bases[lv]},
                "confirmed": confirmed, "screen": sorted(screen, key=lambda r: -r["accuracy"])}
    return {"task": task_name, "base_accuracy": base_accuracy(task), "seed": seed, "draw": spec.draw,
            "candidates": max(len(p) for p in pools.values()),
            "top": spec.top, "finetune_seeds": finetune_seeds, "steps": list(steps), "space": {"ratio_min": space.ratio_min,
            "ratio_max": space.ratio_max, "groups": len(space.groups), "criterion": space.methods[0]},
            "criteria": list(spec.criteria), "levels": levels,
            "finetunes": len(jobs) + len(fresh), "wall_s": time.perf_counter() - start}


def accuracy_of(metrics: Any) -> float:
    """A fine-tune's accuracy; a failed one scores -1 (ranked last) and is logged."""
    if not metrics.ok:
        log.warning("a fine-tune failed: %s", metrics.error)
        return -1.0
    return float(metrics.accuracy)


# How the markdown names each draw's policies.
_DRAWN = {"random": "half drawn over the range, half near uniform; each scaled to the level",
          "extremes": "every group alone at the range's bottom, then alone at its top, the other groups at one "
                      "common ratio solved to the level"}


def markdown(result: Mapping[str, Any]) -> str:
    n, top, f = result["candidates"], result["top"], result["finetune_seeds"]
    draw = result.get("draw", "random")
    lines = [f"## Headroom over uniform pruning: {result['task']}", "",
             f"Base {100 * result['base_accuracy']:.1f}%. Per FLOPs level, {n} policies "
             f"(ratios {result['space']['ratio_min']}-{result['space']['ratio_max']}; {_DRAWN[draw]}) "
             f"fine-tuned once with the study seed (the screen); the screen's "
             f"top {top} and the baselines fine-tuned again with {f} fresh seed(s) (mean). Screen pick: the screen's "
             f"best on the fresh seeds (unbiased); best of top {top}: selected on the fresh seeds themselves "
             f"(optimistic). Δ: against the better baseline. {result['finetunes']} fine-tunes, "
             f"{result['wall_s'] / 60:.1f} min.", "",
             "| FLOPs <= | fine-tune steps | uniform | global magnitude | screen pick | Δ | best of top | Δ | "
             "screened above better baseline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for level, by_steps in result["levels"].items():
        for steps, r in by_steps.items():
            b = r["baselines"]
            lines.append(f"| {100 * float(level):g}% | {steps} | {100 * b['uniform']:.1f} | "
                         f"{100 * b['global_magnitude']:.1f} | {100 * r['screen_pick']:.1f} | "
                         f"{100 * r['screen_pick_delta']:+.1f} | {100 * r['best_of_top']:.1f} | "
                         f"{100 * r['best_of_top_delta']:+.1f} | {100 * r['screen_above_better_baseline']:.0f}% |")
    if draw != "random":
        lines += ["", "The screen's best three per level and length (one fine-tune, the study seed):", ""]
        for level, by_steps in result["levels"].items():
            for steps, r in by_steps.items():
                best = ", ".join(f"{s['label']} {100 * s['accuracy']:.1f}" for s in r["screen"][:3])
                lines.append(f"- {100 * float(level):g}%, {steps} steps: {best}")
    if result.get("criteria"):
        names = [f"uniform_{c}" for c in result["criteria"]]
        lines += ["", f"Uniform pruning with other importance criteria (the rows above use "
                  f"`{result['space']['criterion']}`; global magnitude ranks by L2), the same fresh seeds; "
                  "Δ against the better of uniform and global magnitude:", "",
                  "| FLOPs <= | fine-tune steps | " + " | ".join(f"{n} | Δ" for n in names) + " |",
                  "|---|---|" + "---|---|" * len(names)]
        for level, by_steps in result["levels"].items():
            for steps, r in by_steps.items():
                cells = " | ".join(f"{100 * r['baselines'][n]:.1f} | {100 * r['criteria_delta'][n]:+.1f}" for n in names)
                lines.append(f"| {100 * float(level):g}% | {steps} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--task", default=None, help="task preset (default shapes; quick: digits)")
    parser.add_argument("--candidates", type=int, default=None, help="policies screened per level (default 24)")
    parser.add_argument("--top", type=int, default=None, help="screened policies re-fine-tuned (default 3)")
    parser.add_argument("--finetune-seeds", type=int, default=None, help="fresh fine-tune seeds (default 3)")
    parser.add_argument("--steps", type=int, action="append", default=None,
                        help="fine-tune steps of one column (repeatable; default: the preset's and 5x it)")
    parser.add_argument("--seed", type=int, default=0, help="study seed: candidate draws and the screen (default 0)")
    parser.add_argument("--levels", type=float, nargs="+", default=None,
                        help="FLOPs levels to measure (default: the preset's)")
    parser.add_argument("--ratio-range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="remaining-ratio range of the drawn policies (default: the preset's space)")
    parser.add_argument("--criteria", nargs="+", default=(),
                        help="importance criteria whose uniform policies are fine-tuned as extra rows (e.g. taylor fpgm)")
    parser.add_argument("--draw", default="random",
                        help=f"how the screened policies are chosen: {' or '.join(DRAWS)} (default %(default)s; "
                             "extremes: every group alone at the ratio range's bottom and alone at its top)")
    parser.add_argument("--workers", type=int, default=2, help="evaluation workers (default %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="task model cache (default: studies/cache)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    quick = args.quick
    task = args.task or (QUICK["task"] if quick else "shapes")
    preset = PRESETS.get(task, GENERIC_PRESET)
    try:
        spec = HeadroomRun(
            task=task, quick=quick, seed=args.seed, workers=args.workers, cache_dir=args.cache_dir,
            candidates=args.candidates if args.candidates is not None else (QUICK["candidates"] if quick else 24),
            top=args.top if args.top is not None else (QUICK["top"] if quick else 3),
            finetune_seeds=args.finetune_seeds if args.finetune_seeds is not None else (QUICK["finetune_seeds"] if quick else 3),
            steps=tuple(sorted(set(args.steps or (QUICK["steps"] if quick else
                                                  [preset.finetune_steps, 5 * preset.finetune_steps])))),
            levels=tuple(args.levels) if args.levels else None,
            ratio_range=tuple(args.ratio_range) if args.ratio_range else None,
            criteria=tuple(dict.fromkeys(args.criteria)), draw=args.draw)
        result = run(spec)
    except ValueError as exc:
        parser.error(str(exc))
    config = {**asdict(spec), "wall_seconds": round(result["wall_s"], 1)}
    write_and_report("headroom", quick, result, config=config, out_dir=args.out, markdown=markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
