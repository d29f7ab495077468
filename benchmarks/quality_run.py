"""Running the search-quality benchmark of one task: every method x seed on one shared pool,
the baselines (uniform sweep, global pruning), then one identical fine-tune of each method's
chosen models.

Studies run through the product (``search.runner.run_study``); the baselines and the
fine-tunes are plain evaluations on the same ``EvaluatorPool``, so its actors start once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.hypervolume import hypervolume
from benchmarks.quality_presets import BASELINES, UNIFORM, BenchConfig
from benchmarks.quality_scores import heuristic_result, study_result, uniform_result

if TYPE_CHECKING:
    from evaluators.metrics import Metrics
    from evaluators.pool import EvaluatorPool
    from evaluators.settings import EvalSettings
    from spaces.policy import Policy

log = logging.getLogger("benchmarks.search_quality")


class SharedPool:
    """One ``EvaluatorPool`` reused by every study of a task; ``run_study`` cannot close it.

    ``run_study`` submits proposals without settings (= the study's evaluation settings),
    so the study's settings are bound here before each study. Conforms to the driver's
    pool protocol (``search.pool.Pool``).
    """

    def __init__(self, pool: EvaluatorPool) -> None:
        self.pool = pool
        self.settings: EvalSettings | None = None

    def bind(self, settings: EvalSettings) -> "SharedPool":
        self.settings = settings
        return self

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    @property
    def in_flight(self) -> int:
        return self.pool.in_flight

    def submit(self, policy: Policy, tag: Any = None, settings: EvalSettings | None = None) -> None:
        self.pool.submit(policy, tag=tag, settings=settings if settings is not None else self.settings)

    def results(self, timeout: float | None = None) -> list[tuple[Any, Policy, Metrics]]:
        return self.pool.results(timeout=timeout)

    def close(self) -> None:
        """Kept open for the next study; the benchmark closes the real pool at the end."""


def evaluate_all(pool: SharedPool, jobs: Sequence[tuple[Any, Any, Any]], desc: str) -> dict[Any, Any]:
    """Evaluate ``(tag, policy, settings)`` jobs on the pool; ``{tag: Metrics}``."""
    from tqdm.auto import tqdm

    for tag, policy, settings in jobs:
        pool.submit(policy, tag=tag, settings=settings)
    out: dict[Any, Any] = {}
    with tqdm(total=len(jobs), desc=desc, file=sys.stderr, leave=False, disable=None) as bar:
        while len(out) < len(jobs):
            for tag, _policy, metrics in pool.results(timeout=60):
                out[tag] = metrics
                bar.update(1)
    return out


@contextlib.contextmanager
def evaluation_pool(cfg: BenchConfig, task: Any, space: Any) -> Iterator[EvaluatorPool]:
    """An ``EvaluatorPool`` of ``cfg.workers`` one-thread actors on local Ray (started with as
    many CPUs), ready, closed on exit: what the fine-tune-only benchmarks evaluate on."""
    from evaluators.pool import EvaluatorPool, ensure_ray
    from evaluators.settings import EvalSettings

    ensure_ray(None, num_cpus=cfg.workers)
    pool = EvaluatorPool(task, groups=space.groups, round_to=space.round_to,
                         settings=EvalSettings(**cfg.evaluation(cfg.seeds[0])), workers=cfg.workers,
                         threads_per_worker=1, window=2)
    try:
        pool.wait_ready(timeout=600)
        yield pool
    finally:
        pool.close()


def uniform_policies(space: Any, levels: Sequence[float]) -> list[Any]:
    """The uniform sweep: the space's ratio grid plus the largest uniform ratio within each FLOPs level."""
    ratios = sorted(set(space.levels) | {space.uniform_ratio_within(lv) for lv in levels})
    return [space.uniform(r) for r in ratios]


def global_space(space: Any) -> Any:
    """The space global pruning chooses in: each group keeps 5-100% of its channels, by L2 norm."""
    return space.with_config(ratio_min=0.05, ratio_max=1.0, ratio_step=0.05, methods=("l2",))


def global_policies(method: str, task: Any, space: Any, levels: Sequence[float]) -> list[tuple[float, Any]]:
    """Torch-Pruning global pruning (``method``: an ``evaluators.heuristics`` name) at the
    FLOPs ratios of the uniform sweep's grid points and at each level: ``(target, policy)``.

    Like the uniform baseline it is not limited to the study's grid or ratio range: each
    group keeps 5-100% of its channels (kept / channels, off the grid), chosen within the
    group by their L2 norm as Torch-Pruning chooses them."""
    from evaluators.heuristics import heuristic_policies

    targets = sorted(set(levels) | {space.flops_ratio(space.uniform(r)) for r in space.levels})
    policies = heuristic_policies(method, global_space(space), targets, model=task.base_model(),
                                  example_inputs=task.example_inputs, on_grid=False)
    return list(zip(targets, policies))


class Checkpoint:
    """Per-study results of an unfinished run, saved after every study (``--resume`` reuses them).

    A full run takes long on a shared machine; losing it to one killed process is worse
    than one more small file. Results are reused only for the same task configuration.
    """

    def __init__(self, path: Path | None, resume: bool) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        if path is not None and resume and path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except ValueError:
                log.warning("checkpoint %s unreadable; starting afresh", path)

    def task(self, cfg: BenchConfig) -> dict[str, Any]:
        """The saved state of ``cfg``'s task (empty when none or made with another configuration)."""
        fp = cfg.fingerprint()
        saved = self.data.get(cfg.task)
        if saved is not None and saved.get("fingerprint") != fp:
            log.warning("checkpoint for %s was made with another configuration; not reused", cfg.task)
            saved = None
        if saved is None:
            saved = {"fingerprint": fp, "per_seed": {}, "elapsed_s": 0.0}
            self.data[cfg.task] = saved
        return saved

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, default=str))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


def base_accuracy(task: Any) -> float:
    """The unpruned base model's accuracy on the whole validation split (one thread)."""
    from evaluators.evaluate import evaluate_model
    from evaluators.settings import EvalSettings

    return float(evaluate_model(task.base_model(), task, EvalSettings(threads=1)).accuracy)


def task_info(cfg: BenchConfig, task: Any, space: Any, load_s: float) -> dict[str, Any]:
    """The task's base model and space, as the report describes them."""
    accuracy = base_accuracy(task)
    info = {
        "task": cfg.task, "task_options": dict(cfg.preset.options), "load_s": load_s,
        "base_accuracy": accuracy, "base_mflops": space.base_cost.flops / 1e6,
        "groups": len(space.groups), "validation_samples": len(task.validation[1]),
        "train_samples": len(task.train[1]), "uniform_min_flops_ratio": space.flops_ratio(space.uniform(space.ratio_min)),
    }
    log.info("%s: base accuracy %.4f, %.1f MFLOPs, %d groups", cfg.task, accuracy,
             info["base_mflops"], info["groups"])
    return info


def run_method(cfg: BenchConfig, method: str, seed: int, shared: SharedPool, task_and_space: tuple[Any, Any],
               storage_dir: Path) -> dict[str, Any]:
    """One method's result for one seed: a study through ``run_study``, or a baseline."""
    from search.runner import run_study
    from search.setup import prepare

    levels = cfg.preset.levels
    if method in BASELINES:
        return run_baseline(cfg, method, seed, shared, task_and_space)
    config = cfg.study_config(method, seed, storage_dir)
    prepared = prepare(config, task_and_space=task_and_space)
    summary = run_study(config, prepared=prepared, progress=False,
                        pool_factory=lambda p, _addr: shared.bind(p.config.evaluation))
    return study_result(summary, levels, cfg.hv_levels)


def run_baseline(cfg: BenchConfig, method: str, seed: int, shared: SharedPool,
                 task_and_space: tuple[Any, Any]) -> dict[str, Any]:
    """A baseline's result for one seed: its policies evaluated with the studies' proxy settings."""
    from evaluators.settings import EvalSettings

    start = time.perf_counter()
    task, space = task_and_space
    levels, max_flops = cfg.preset.levels, cfg.preset.max_flops_ratio
    settings = EvalSettings(**cfg.evaluation(seed))
    if method == UNIFORM:
        policies = uniform_policies(space, levels)
        got = evaluate_all(shared, [(("u", seed, i), p, settings) for i, p in enumerate(policies)],
                           f"uniform seed {seed}")
        res = uniform_result([(p, got[("u", seed, i)]) for i, p in enumerate(policies)], levels, max_flops,
                             cfg.hv_levels)
    else:
        targets = global_policies(method, task, space, sorted({*levels, *cfg.hv_levels}))
        got = evaluate_all(shared, [((method, seed, i), p, settings) for i, (_, p) in enumerate(targets)],
                           f"{method} seed {seed}")
        res = heuristic_result([(t, p, got[(method, seed, i)]) for i, (t, p) in enumerate(targets)], levels,
                               max_flops, cfg.hv_levels)
    res["wall_s"] = time.perf_counter() - start
    return res


def run_task(cfg: BenchConfig, checkpoint: Checkpoint | None = None) -> dict[str, Any]:
    """Every method x seed of one task, then the equal fine-tune; raw per-seed results."""
    import torch

    from evaluators.pool import EvaluatorPool, ensure_ray
    from evaluators.settings import EvalSettings
    from search.setup import load_task_and_space, make_searchers, ray_cpus

    torch.set_num_threads(1)
    start = time.perf_counter()
    probe = cfg.study_config(cfg.searchers[0] if cfg.searchers else "random", cfg.seeds[0], Path("."))
    task, space = load_task_and_space(probe)
    configs = [cfg.study_config(m, cfg.seeds[0], Path(".")) for m in cfg.searchers]
    info = task_info(cfg, task, space, time.perf_counter() - start)
    # Ray starts as `prunesearch run` starts it: the pool's actors plus the largest need of
    # any method's searchers (the studies run one after another).
    ensure_ray(None, num_cpus=max([cfg.workers, *(ray_cpus(c, make_searchers(c, space, task)) for c in configs)]))
    pool = EvaluatorPool(task, groups=space.groups, round_to=space.round_to,
                         settings=EvalSettings(**cfg.evaluation(cfg.seeds[0])), workers=cfg.workers,
                         threads_per_worker=1, window=2)
    shared = SharedPool(pool)
    checkpoint = checkpoint or Checkpoint(None, False)
    saved = checkpoint.task(cfg)
    previous_s = float(saved.get("elapsed_s", 0.0))
    try:
        pool.wait_ready(timeout=600)
        per_seed = _run_studies(cfg, shared, (task, space), checkpoint, saved, start)
        info["finetune_timing"] = finetune(cfg, shared, per_seed)
    finally:
        pool.close()
    info["wall_s"] = previous_s + time.perf_counter() - start  # a resumed run adds the earlier part
    if previous_s:
        info["resumed_after_s"] = previous_s
    return {**info, "per_seed": per_seed}


def _run_studies(cfg: BenchConfig, shared: SharedPool, task_and_space: tuple[Any, Any], checkpoint: Checkpoint,
                 saved: dict[str, Any], start: float) -> dict[str, dict[str, Any]]:
    """Every (seed, method) not in the checkpoint yet; the checkpoint is saved after each."""
    from tqdm.auto import tqdm

    per_seed: dict[str, dict[str, Any]] = {m: dict(saved["per_seed"].get(m, {})) for m in cfg.methods}
    previous_s = float(saved.get("elapsed_s", 0.0))
    jobs = [(seed, m) for seed in cfg.seeds for m in cfg.methods]
    with tempfile.TemporaryDirectory(prefix="prunesearch-bench-") as tmp, \
            tqdm(total=len(jobs), desc=f"{cfg.task} studies", file=sys.stderr, disable=None) as bar:
        for seed, method in jobs:
            if str(seed) in per_seed[method]:
                log.info("%s seed %d %s: reused from the checkpoint", cfg.task, seed, method)
                bar.update(1)
                continue
            t = time.perf_counter()
            res = run_method(cfg, method, seed, shared, task_and_space, Path(tmp))
            per_seed[method][str(seed)] = res
            saved["per_seed"] = per_seed
            saved["elapsed_s"] = previous_s + time.perf_counter() - start
            checkpoint.save()
            log.info("%s seed %d %s: HV %.4f, best proxy %s, %.0f s", cfg.task, seed, method, res["hypervolume"],
                     {lv: round(b["accuracy"], 4) for lv, b in res["best_proxy"].items() if b},
                     time.perf_counter() - t)
            bar.set_postfix(method=method, seed=seed, hv=f"{res['hypervolume']:.3f}")
            bar.update(1)
    return per_seed


def finetune(cfg: BenchConfig, shared: SharedPool, per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Fine-tune every method's chosen models identically, with ``cfg.finetune_seeds``
    fine-tune seeds: the best per reported level (adds ``finetuned``: their mean, and each)
    and the models spread over the FLOPs range (adds ``finetuned_hv``, the hypervolume of
    every fine-tuned model of the study); timing."""
    from evaluators.settings import EvalSettings
    from spaces.policy import Policy

    jobs, wanted = [], {}

    def indices(seed: str, best: dict[str, Any]) -> list[int]:
        policy = Policy.from_dict(best["policy"])
        out = []
        for k in range(cfg.finetune_seeds):
            key = (seed, k, policy.key())  # the same model chosen twice is fine-tuned once
            if key not in wanted:
                wanted[key] = len(jobs)
                jobs.append((len(jobs), policy, EvalSettings(**cfg.finetune_settings(int(seed), k))))
            out.append(wanted[key])
        return out

    for method, seeds in per_seed.items():
        for seed, res in seeds.items():
            res["finetuned"] = {level: indices(seed, best) for level, best in res["best_proxy"].items()
                                if best is not None and float(level) in cfg.preset.tuned_levels}
            res["hv_finetuned"] = [indices(seed, best) for best in res.get("hv_models", {}).values() if best]
    log.info("%s: %d fine-tunes (%d steps each, %d seed(s) per model)", cfg.task, len(jobs),
             cfg.preset.finetune_steps, cfg.finetune_seeds)
    t = time.perf_counter()
    got = evaluate_all(shared, jobs, f"{cfg.task} fine-tune")
    elapsed = time.perf_counter() - t
    for method, seeds in per_seed.items():
        for seed, res in seeds.items():
            res["finetuned"] = {level: _finetuned([got[i] for i in ix]) for level, ix in res["finetuned"].items()}
            models = [_finetuned([got[i] for i in ix]) for ix in res.pop("hv_finetuned")]
            models += list(res["finetuned"].values())
            res["finetuned_hv"] = hypervolume([(m["accuracy"], m["flops_ratio"]) for m in models if "accuracy" in m
                                               and m["flops_ratio"] <= cfg.preset.max_flops_ratio + 1e-12])
    return {"models": len(jobs), "steps": cfg.preset.finetune_steps, "seeds": cfg.finetune_seeds, "wall_s": elapsed}


def _finetuned(runs: Sequence[Any]) -> dict[str, Any]:
    """One chosen model's fine-tunes: the mean accuracy over its fine-tune seeds, and each."""
    failed = [m for m in runs if not m.ok]
    if failed:
        return {"error": failed[0].error}
    accuracies = [float(m.accuracy) for m in runs]
    return {"accuracy": sum(accuracies) / len(accuracies), "accuracies": accuracies,
            "flops_ratio": runs[0].flops_ratio, "eval_seconds": sum(m.eval_seconds for m in runs)}
