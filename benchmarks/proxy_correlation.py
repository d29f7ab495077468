"""Proxy correlation: how well each cheap proxy ranks pruned policies the way a longer fine-tune does.

For each task, policies spread over the FLOPs range (``spanning_policies``: a random global
level plus per-group jitter) are evaluated under every proxy (adaptive BN, CaP compensation
with and without the BN pass, short KD fine-tunes) and under the reference: the same KD
fine-tune run for more steps. Every evaluation goes through ``evaluators.evaluate.evaluate``
(on the Ray ``EvaluatorPool`` with ``--workers`` >= 1, in this process with 0) and is scored on
the same validation samples. Reports Spearman and Kendall of each proxy against the
reference over all policies (with a bootstrap interval over policies), the mean Spearman
within FLOPs bins (how well a proxy ranks policies of similar size, which is what a
constrained search needs), and each proxy's cost per evaluation. ``flops`` (the policy's
FLOPs ratio, free) is the baseline a proxy has to beat. Writes
``benchmarks/results/proxy_correlation.json`` and ``.md``.

    python -m benchmarks.proxy_correlation            # full run
    python -m benchmarks.proxy_correlation --quick    # smoke run (< 1 min)
    python -m benchmarks.proxy_correlation --summarize first.json [more.json ...]   # merge draws
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.common import ROOT, base_parser, setup_logging, write_and_report  # noqa: E402

log = logging.getLogger("benchmarks.proxy_correlation")

REFERENCE = "reference"
FLOPS = "flops"            # the policy's FLOPs ratio: free, the baseline every proxy must beat
TASKS = ("shapes", "digits")
# Search spaces as the search-quality benchmark uses them (benchmarks/quality_presets.py).
SPACES: dict[str, dict[str, float]] = {"shapes": {"ratio_min": 0.1, "ratio_max": 0.8},
                                       "digits": {"ratio_min": 0.2, "ratio_max": 1.0}}
# Full mode fits about 25 minutes on the shared 2-core machine: a shapes fine-tune step costs
# ~0.11 s, a digits step ~0.06 s, so each policy costs ~550 fine-tune steps (50 + 200 + the
# 300-step reference) and the policy count is what that budget allows.
FULL = {"policies": 20, "short_steps": (50, 200), "reference_steps": {"shapes": 300, "digits": 300},
        "bootstrap": 1000, "bins": 2, "workers": 2}
QUICK = {"policies": 4, "short_steps": (2, 5), "reference_steps": {"shapes": 10, "digits": 10},
         "bootstrap": 50, "bins": 1, "workers": 0}


def proxy_settings(short_steps: Sequence[int], reference_steps: int, finetune_lr: float = 0.01,
                   seed: int = 0) -> dict[str, dict[str, Any]]:
    """EvalSettings overrides per proxy name, the reference last (all scored on the whole validation split)."""
    common = {"eval_samples": None, "seed": seed, "threads": 1}
    out: dict[str, dict[str, Any]] = {name: {"recovery": name, **common} for name in ("adaptive_bn", "cap", "cap_nobn")}
    tune = {"recovery": "finetune", "kd": True, "finetune_lr": finetune_lr, **common}
    for steps in short_steps:
        out[f"finetune_{steps}"] = {**tune, "finetune_steps": steps}
    out[REFERENCE] = {**tune, "finetune_steps": reference_steps}
    return out


# -- summaries (pure functions of the measured numbers) -------------------------------------------
def rank_correlation(proxy: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Spearman and Kendall (tau-b) of ``proxy`` against ``reference``; NaN when either is constant."""
    from scipy import stats

    if len(proxy) != len(reference) or len(proxy) < 2:
        raise ValueError(f"need two equal-length sequences of >= 2 values, got {len(proxy)} and {len(reference)}")
    if len(set(proxy)) < 2 or len(set(reference)) < 2:
        return {"spearman": float("nan"), "kendall": float("nan")}
    return {"spearman": float(stats.spearmanr(proxy, reference).statistic),
            "kendall": float(stats.kendalltau(proxy, reference).statistic)}


def bootstrap_interval(proxy: Sequence[float], reference: Sequence[float], n: int, seed: int = 0,
                       level: float = 0.9) -> dict[str, list[float] | None]:
    """Percentile interval of Spearman and Kendall over ``n`` resamples of the policies (``None``
    when too few resamples have a defined correlation)."""
    rng = np.random.default_rng(seed)
    p, r = np.asarray(proxy, dtype=float), np.asarray(reference, dtype=float)
    draws: dict[str, list[float]] = {"spearman": [], "kendall": []}
    for _ in range(n):
        idx = rng.integers(0, len(p), len(p))
        got = rank_correlation(p[idx].tolist(), r[idx].tolist())
        for key, value in got.items():
            if np.isfinite(value):
                draws[key].append(value)
    tail = (1.0 - level) / 2 * 100
    return {key: ([float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] if len(v) >= max(2, n // 2)
                  else None) for key, v in draws.items()}


def within_bins(proxy: Sequence[float], reference: Sequence[float], flops: Sequence[float], bins: int) -> float:
    """Mean Spearman over ``bins`` equal-count FLOPs bins (policies of similar size); NaN when no
    bin has a defined correlation."""
    order = np.argsort(np.asarray(flops, dtype=float), kind="stable")
    values = []
    for chunk in np.array_split(order, bins):
        if len(chunk) < 3:
            continue
        rho = rank_correlation([proxy[i] for i in chunk], [reference[i] for i in chunk])["spearman"]
        if np.isfinite(rho):
            values.append(rho)
    return float(np.mean(values)) if values else float("nan")


def partial_spearman(proxy: Sequence[float], reference: Sequence[float], flops: Sequence[float]) -> float:
    """Spearman of ``proxy`` and ``reference`` with the FLOPs ranks partialled out: how well the
    proxy ranks policies beyond what their size says. NaN when undefined (e.g. the proxy is FLOPs)."""
    r_pr = rank_correlation(proxy, reference)["spearman"]
    r_pf = rank_correlation(proxy, flops)["spearman"]
    r_rf = rank_correlation(reference, flops)["spearman"]
    denominator = (1 - r_pf ** 2) * (1 - r_rf ** 2)
    if not np.isfinite(denominator) or denominator <= 1e-12:
        return float("nan")
    return float((r_pr - r_pf * r_rf) / np.sqrt(denominator))


def cost_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Mean and total seconds of a proxy's evaluations (inside the evaluator, 1 thread)."""
    if not seconds:
        raise ValueError("no evaluations to summarise")
    return {"mean_s": statistics.fmean(seconds), "total_s": float(sum(seconds))}


def summarize(records: Sequence[Mapping[str, Any]], proxies: Sequence[str], bootstrap: int, bins: int) -> dict[str, Any]:
    """Per proxy: correlations with the reference, bootstrap interval, within-bin Spearman, cost.

    ``records``: one per policy, ``{"flops_ratio": f, "accuracy": {proxy: a}, "seconds": {proxy: s}}``
    with the reference among the proxies.
    """
    reference = [r["accuracy"][REFERENCE] for r in records]
    flops = [r["flops_ratio"] for r in records]
    out: dict[str, Any] = {}
    for name in (FLOPS, *proxies):
        if name == REFERENCE:
            continue
        values = flops if name == FLOPS else [r["accuracy"][name] for r in records]
        entry: dict[str, Any] = {**rank_correlation(values, reference),
                                 "interval": bootstrap_interval(values, reference, bootstrap),
                                 "within_bins_spearman": within_bins(values, reference, flops, bins),
                                 "partial_spearman": partial_spearman(values, reference, flops)}
        entry["cost"] = (cost_summary([r["seconds"][name] for r in records]) if name != FLOPS
                         else {"mean_s": 0.0, "total_s": 0.0})
        out[name] = entry
    out[REFERENCE] = {"cost": cost_summary([r["seconds"][REFERENCE] for r in records])}
    return out


# -- running ---------------------------------------------------------------------------------------
def load_task_and_space(name: str) -> tuple[Any, Any]:
    """The built-in task (cached base model) and its search space as the search benchmark uses it."""
    from evaluators.tasks import load_task
    from spaces.space import SearchSpace, SpaceConfig

    task = load_task(name, {}, cache_dir=ROOT / "studies" / "cache")
    space = SearchSpace.from_model(task.base_model(), task.example_inputs, SpaceConfig(**SPACES[name]))
    return task, space


def evaluate_jobs(task: Any, space: Any, jobs: Sequence[tuple[Any, Any, Any]], workers: int) -> dict[Any, Any]:
    """Evaluate ``(tag, policy, settings)`` jobs: on an ``EvaluatorPool`` of ``workers`` actors, or
    in this process when ``workers`` is 0; ``{tag: Metrics}``. A failed evaluation is an error."""
    if workers == 0:
        from evaluators.evaluate import evaluate
        from evaluators.measure import model_cost

        base = task.base_model()
        base_cost = model_cost(base, task.example_inputs)
        got = {tag: evaluate(p, task, s, groups=space.groups, base_model=base, base_cost=base_cost)
               for tag, p, s in jobs}
    else:
        from benchmarks.quality_run import evaluate_all
        from evaluators.pool import EvaluatorPool, ensure_ray

        ensure_ray(None, num_cpus=workers)
        pool = EvaluatorPool(task, groups=space.groups, round_to=space.round_to, settings=jobs[0][2],
                             workers=workers, threads_per_worker=1, window=2)
        try:
            pool.wait_ready(timeout=600)
            got = evaluate_all(pool, jobs, f"{task.name} proxies")
        finally:
            pool.close()
    failed = [(tag, m.error) for tag, m in got.items() if not m.ok]
    if failed:
        raise RuntimeError(f"evaluation {failed[0][0]} failed: {failed[0][1]}")
    return got


def run_task(name: str, cfg: Mapping[str, Any], workers: int, seed: int = 0) -> dict[str, Any]:
    """Every policy under every proxy and the reference on one task; raw records and summary."""
    import torch

    from benchmarks.quality_run import base_accuracy
    from evaluators.latency_table import spanning_policies
    from evaluators.settings import EvalSettings

    torch.set_num_threads(1)
    start = time.perf_counter()
    task, space = load_task_and_space(name)
    settings = {k: EvalSettings(**v) for k, v in
                proxy_settings(cfg["short_steps"], cfg["reference_steps"][name], seed=seed).items()}
    policies = spanning_policies(space, cfg["policies"], seed=cfg.get("policy_seed", seed))
    # The longest evaluations first, so the workers finish together.
    order = sorted(settings, key=lambda k: -settings[k].finetune_steps)
    jobs = [((proxy, i), p, settings[proxy]) for proxy in order for i, p in enumerate(policies)]
    log.info("%s: %d policies x %d settings", name, len(policies), len(settings))
    t = time.perf_counter()
    got = evaluate_jobs(task, space, jobs, workers)
    eval_wall = time.perf_counter() - t
    records = [{"policy": p.to_dict(), "flops_ratio": got[(REFERENCE, i)].flops_ratio,
                "accuracy": {k: got[(k, i)].accuracy for k in settings},
                "seconds": {k: got[(k, i)].eval_seconds for k in settings}} for i, p in enumerate(policies)]
    proxies = [k for k in settings if k != REFERENCE]
    flops = [r["flops_ratio"] for r in records]
    return {
        "task": name, "space": SPACES[name], "policies": len(policies),
        "base_accuracy": base_accuracy(task),
        "validation_samples": len(task.validation[1]), "flops_range": [min(flops), max(flops)],
        "settings": {k: s.to_dict() for k, s in settings.items()}, "proxies": proxies,
        "summary": summarize(records, proxies, cfg["bootstrap"], cfg["bins"]),
        "records": records, "evaluation_wall_s": eval_wall, "wall_s": time.perf_counter() - start,
    }


# -- report ----------------------------------------------------------------------------------------
def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _with_interval(entry: Mapping[str, Any], key: str) -> str:
    interval = entry["interval"].get(key)
    text = _num(entry[key])
    return text if interval is None else f"{text} [{_num(interval[0])}, {_num(interval[1])}]"


def best_untrained(summary: Mapping[str, Any]) -> str | None:
    """The training-free proxy (not ``flops``) that ranks policies best beyond their size
    (highest partial Spearman given FLOPs)."""
    scored = {k: v["partial_spearman"] for k, v in summary.items()
              if k not in (FLOPS, REFERENCE) and not k.startswith("finetune")
              and v.get("partial_spearman") is not None and np.isfinite(v["partial_spearman"])}
    return max(scored, key=scored.get) if scored else None


def task_markdown(res: Mapping[str, Any], loaded: bool) -> list[str]:
    """One task's table: correlations with the reference and cost per proxy."""
    ref = res["settings"][REFERENCE]
    lines = [f"### {res['task']}", "",
             f"{res['policies']} policies, FLOPs ratio {res['flops_range'][0]:.2f}-{res['flops_range'][1]:.2f}; "
             f"reference: KD fine-tune of {ref['finetune_steps']} steps (lr {ref['finetune_lr']}, batch "
             f"{ref['batch_size']}); base accuracy {100 * res['base_accuracy']:.1f}%, scored on all "
             f"{res['validation_samples']} validation samples.", "",
             f"| proxy | Spearman [90% CI] | Kendall [90% CI] | Spearman within {res['bins']} FLOPs bins | "
             f"partial Spearman given FLOPs | s/eval{' (loaded machine)' if loaded else ''} |",
             "|---|---|---|---|---|---|"]
    for name, entry in res["summary"].items():
        if name == REFERENCE:
            continue
        lines.append(f"| {name} | {_with_interval(entry, 'spearman')} | {_with_interval(entry, 'kendall')} | "
                     f"{_num(entry['within_bins_spearman'])} | {_num(entry['partial_spearman'])} | "
                     f"{_num(entry['cost']['mean_s'])} |")
    lines.append(f"| {REFERENCE} | 1 | 1 | 1 | 1 | {_num(res['summary'][REFERENCE]['cost']['mean_s'])} |")
    best = best_untrained(res["summary"])
    if best:
        lines += ["", f"Best training-free proxy beyond FLOPs (partial Spearman): `{best}`."]
    return lines


def markdown(results: Mapping[str, Any], loaded: bool) -> str:
    lines = ["## Proxy correlation", "",
             "Rank correlation between each proxy's accuracy and the accuracy after a longer identical KD "
             "fine-tune (the reference), over policies spread over the FLOPs range. `flops` ranks by size "
             "alone; the within-bin and partial columns measure how well a proxy ranks policies of similar "
             "size, as a FLOPs-constrained search must. Intervals: bootstrap over policies. s/eval: one `evaluate` call, 1 thread"
             + (", measured while other work shared the 2 cores." if loaded else "."),
             "EagleEye (Li et al. 2020) reports a strong positive correlation between adaptive-BN accuracy "
             "and fine-tuned accuracy; these tasks are small and the reference fine-tune short, so compare "
             "the direction, not the figure.", ""]
    for res in results["tasks"].values():
        lines += task_markdown(res, loaded) + [""]
    return "\n".join(lines)


def resummarize(paths: Sequence[str], out: str) -> int:
    """Recompute every task's summary and the markdown from the records of written results; the
    records of further files (other policy draws, same settings) join the first file's tasks."""
    import json

    files = [json.loads(open(p).read()) for p in paths]
    cfg, results = files[0]["config"], files[0]["results"]
    for extra in files[1:]:
        for name, more in extra["results"]["tasks"].items():
            res = results["tasks"].get(name)
            if res is None or more["settings"] != res["settings"]:
                raise SystemExit(f"error: {name} in a later file has no match with the same settings in the first")
            res["records"] = res["records"] + more["records"]
            res["wall_s"] += more["wall_s"]
            res["evaluation_wall_s"] += more["evaluation_wall_s"]
    for res in results["tasks"].values():
        flops = [r["flops_ratio"] for r in res["records"]]
        res.update(policies=len(res["records"]), flops_range=[min(flops), max(flops)],
                   summary=summarize(res["records"], res["proxies"], cfg["bootstrap"], cfg["bins"]))
    config = {**cfg, "summarized_from": [f.get("created") for f in files],
              "policy_seeds": [f["config"].get("policy_seed", 0) for f in files]}
    write_and_report("proxy_correlation", cfg["quick"], results, config=config, out_dir=out,
                     markdown=markdown(results, results["loaded_machine"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (default: %(default)s)")
    parser.add_argument("--policies", type=int, default=None, help="policies per task (default: mode's)")
    parser.add_argument("--workers", type=int, default=None, help="Ray evaluation workers; 0 = in this process")
    parser.add_argument("--policy-seed", type=int, default=0, help="seed of the policy draw (default: %(default)s)")
    parser.add_argument("--summarize", metavar="JSON", nargs="+", default=None,
                        help="only recompute the summaries and markdown from written results' records "
                             "(records of later files join the first's tasks)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.summarize:
        return resummarize(args.summarize, args.out)
    cfg = {**(QUICK if args.quick else FULL), "policy_seed": args.policy_seed}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in SPACES]
    if not tasks or unknown:
        parser.error(f"unknown task {unknown[0] if unknown else args.tasks!r} (known: {', '.join(TASKS)})")
    for key, value in (("policies", args.policies), ("workers", args.workers)):
        if value is not None:
            if value < (3 if key == "policies" else 0):
                parser.error(f"--{key} must be >= {3 if key == 'policies' else 0}, got {value}")
            cfg[key] = value
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    results: dict[str, Any] = {"tasks": {}}
    for name in tasks:
        res = run_task(name, cfg, cfg["workers"])
        res["bins"] = cfg["bins"]
        results["tasks"][name] = res
        load_end = os.getloadavg()[0]
        # Another process on the machine: a 1-minute load above this run's own workers.
        results["loaded_machine"] = max(load_start, load_end) > max(1, cfg["workers"]) + 0.5
        results["load_average_1min"] = [load_start, load_end]
        # Written after every task, so a long run that is stopped keeps the finished tasks.
        results["complete"] = len(results["tasks"]) == len(tasks)
        config = {**cfg, "tasks": tasks, "quick": args.quick, "wall_seconds": round(time.perf_counter() - start, 1)}
        write_and_report("proxy_correlation", args.quick, results, config=config, out_dir=args.out,
                         markdown=markdown(results, results["loaded_machine"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
