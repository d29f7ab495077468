"""GPU check: the CUDA paths of prunesearch, once, on a machine with a GPU (< 5 min on one GPU).

    .venv/bin/python -m benchmarks.gpu_check            # -> benchmarks/results/gpu_check.json

1. ``prunesearch run`` of a digits study with ``[evaluation] device = "cuda"``, 2 workers at
   ``gpus_per_worker = 0.5`` (both on one GPU), Taylor and L1 importance, fine-tune and CaP
   recoveries, latency timed on CUDA in every evaluation (``measure_latency``);
2. ``prunesearch export`` of its Pareto front (rebuilt, re-measured and fine-tuned on the
   GPU, saved from the CPU), each export's weights reloaded on the CPU;
3. in this process: the GPU ids Ray gives two pool workers at 0.5 GPU, one evaluation and
   one build with a base model on the GPU (the pruned model must stay there), and the base
   model's latency on CUDA (event timing) next to the CPU's.

Every step is a check; the JSON lists each with its figures, and the exit code is 0 only
when all passed. Not part of ``make bench``/``bench-quick`` (``benchmarks/__main__.py``
does not list it): those run on machines without a GPU. Without CUDA it exits 1 with one
line; ``--dry-run-on-cpu`` runs the same steps with ``device = "cpu"`` and declared GPUs to
test this script itself (its JSON then says so, and proves nothing about CUDA).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, ROOT, write_result

TRIALS = 12
LIMIT_S = 240  # each CLI step; the whole check must stay under 5 minutes on one GPU


def study_toml(tmp: Path, device: str, trials: int) -> Path:
    text = f"""
        [study]
        name = "gpu_check"
        storage = "sqlite:///{tmp}/gpu_check.db"
        n_trials = {trials}
        seed = 0
        workers = 2
        threads_per_worker = 1
        gpus_per_worker = 0.5
        log_file = "{tmp}/gpu_check.log"

        [task]
        name = "digits"
        cache_dir = "{ROOT / 'studies' / 'cache'}"

        [space]
        ratio_min = 0.3
        ratio_step = 0.1
        methods = ["l1", "taylor"]
        recoveries = ["finetune", "cap"]

        [evaluation]
        device = "{device}"
        finetune_steps = 6
        calibration_samples = 256
        bn_batches = 4
        measure_latency = true

        [latency]
        batch = 8
        runs = 10
        warmup = 3

        [export]
        dir = "{tmp}/exports"
        finetune_steps = 10
        formats = ["pt2"]

        [[searchers]]
        kind = "random"
        """
    path = tmp / "gpu_check.toml"
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def cli(*args: str) -> dict[str, Any]:
    """``prunesearch <args>`` in a fresh process (its own Ray); exit code, wall time, output tail."""
    start = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, "-m", "search", *args, *(["--no-progress"] if args[0] == "run" else [])],
                             cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)
        code, out = run.returncode, (run.stdout + run.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        code, out = None, f"timed out after {LIMIT_S} s"
    return {"command": "prunesearch " + " ".join(args), "exit_code": code, "wall_s": round(time.perf_counter() - start, 1),
            "output_tail": out}


def study_figures(config_path: Path) -> dict[str, Any]:
    """What the study recorded: trial states, errors, latency and evaluation seconds."""
    from search.config import load_config
    from search.storage import load_records

    records = load_records(load_config(config_path))
    done = [r for r in records if r.metrics is not None and r.metrics.ok]
    errors = sorted({r.metrics.error for r in records if r.metrics is not None and r.metrics.error})
    return {
        "trials": len(records), "complete": len(done), "errors": errors[:5],
        "latency_ms": [r.metrics.latency_ms for r in done],
        "eval_seconds": [round(r.metrics.eval_seconds, 2) for r in done],
        "accuracy": [r.metrics.accuracy for r in done],
    }


def exported_figures(out: Path) -> dict[str, Any]:
    """Each exported trial: recorded vs re-measured accuracy, and whether its weights load on the CPU."""
    import torch

    trials = {}
    for directory in sorted(out.glob("trial-*")):
        info = json.loads((directory / "metrics.json").read_text())
        state = torch.load(directory / "weights.pt", map_location="cpu", weights_only=True)
        trials[directory.name] = {
            "recorded_accuracy": (info.get("recorded") or {}).get("accuracy"),
            "remeasured_accuracy": info["remeasured"]["accuracy"],
            "exported_accuracy": info["exported"]["accuracy"],
            "exported_latency_ms": info["exported"].get("latency_ms"),
            "weights_on_cpu": all(t.device.type == "cpu" for t in state.values()),
            "model_pt2": (directory / "model.pt2").is_file(),
        }
    return trials


def in_process(device: str) -> dict[str, Any]:
    """Pool GPU ids at 0.5, one evaluation with the base model on the device, CUDA vs CPU latency."""
    import ray
    import torch

    from evaluators import timing
    from evaluators.build import build_pruned
    from evaluators.devices import model_device, resolve_device, to_device
    from evaluators.evaluate import evaluate
    from evaluators.pool import EvaluatorPool
    from evaluators.settings import EvalSettings
    from evaluators.tasks import load_task
    from spaces.space import SearchSpace

    task = load_task("digits", cache_dir=ROOT / "studies" / "cache")
    space = SearchSpace.from_model(task.base_model(), task.example_inputs, ratio_min=0.3, methods=("taylor",))
    settings = EvalSettings(device=device, recovery="finetune", finetune_steps=6, measure_latency=True)
    target = resolve_device(device)
    base = task.base_model().to(target)
    metrics = evaluate(space.uniform(0.5), task, settings, groups=space.groups, base_model=base)
    pruned = build_pruned(space.uniform(0.5), task, settings, groups=space.groups, base=base)
    inputs = timing.latency_inputs(task.example_inputs, 8)
    latency = {"base_on_device_ms": timing.measure_latency_ms(base, to_device(inputs, target), runs=20, warmup=5),
               "base_on_cpu_ms": timing.measure_latency_ms(task.base_model(), inputs, runs=20, warmup=5)}
    ray.init(address="local", num_gpus=None if torch.cuda.is_available() else 1, include_dashboard=False,
             configure_logging=False)
    try:
        pool = EvaluatorPool(task, groups=space.groups, settings=settings, workers=2, gpus_per_worker=0.5)
        gpu_ids = pool.worker_gpu_ids()
        pool.close()
    finally:
        ray.shutdown()
    return {"evaluation": {"ok": metrics.ok, "error": metrics.error, "accuracy": metrics.accuracy,
                           "latency_ms": metrics.latency_ms, "timings": metrics.timings},
            "base_model_device": str(model_device(base)), "pruned_model_device": str(model_device(pruned)),
            "device": str(target), "latency": latency, "worker_gpu_ids": gpu_ids}


def checks(run: dict, figures: dict, export: dict, exported: dict, local: dict, trials: int) -> dict[str, bool]:
    ids = [tuple(map(str, i)) for i in local.get("worker_gpu_ids", [])]
    return {
        "study_ran": run["exit_code"] == 0 and figures.get("complete") == trials,
        "latency_timed_every_trial": bool(figures.get("latency_ms")) and all(v and v > 0 for v in figures["latency_ms"]),
        "export_ran": export["exit_code"] == 0 and bool(exported),
        "export_saved_from_cpu": bool(exported) and all(t["weights_on_cpu"] and t["model_pt2"] for t in exported.values()),
        "evaluation_on_device_ok": bool(local.get("evaluation", {}).get("ok")),
        "pruned_model_stays_on_device": local.get("pruned_model_device") == local.get("device"),
        "two_workers_share_one_gpu": len(ids) == 2 and all(len(i) == 1 for i in ids) and ids[0] == ids[1],
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR), help="directory for gpu_check.json (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=TRIALS, help="trials of the study (default: %(default)s)")
    parser.add_argument("--dry-run-on-cpu", action="store_true",
                        help="test this script without a GPU: device = cpu, declared GPUs; proves nothing about CUDA")
    args = parser.parse_args(argv)
    dry = args.dry_run_on_cpu
    if not dry and not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available here (torch {torch.__version__}, torch.cuda.is_available() is "
              "False): run it on a machine with a GPU", file=sys.stderr)
        return 1
    device = "cpu" if dry else "cuda"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        config = study_toml(Path(tmp), device, args.trials)
        run = cli("run", str(config))
        figures = study_figures(config) if run["exit_code"] == 0 else {}
        export = cli("export", str(config), "--out", f"{tmp}/exports")
        exported = exported_figures(Path(tmp) / "exports") if export["exit_code"] == 0 else {}
    local = in_process(device)
    passed = checks(run, figures, export, exported, local, args.trials)
    results = {"device": device, "dry_run_on_cpu": dry,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "checks": passed, "study": {**run, **figures}, "export": {**export, "trials": exported},
               "in_process": local, "wall_s": round(time.perf_counter() - start, 1)}
    path = write_result("gpu_check" + ("_cpu_dry_run" if dry else ""), results,
                        config={"trials": args.trials, "workers": 2, "gpus_per_worker": 0.5}, out_dir=args.out)
    failed = [name for name, ok in passed.items() if not ok]
    print(f"gpu_check: {len(passed) - len(failed)}/{len(passed)} checks passed in {results['wall_s']} s"
          f"{' (failed: ' + ', '.join(failed) + ')' if failed else ''}; {path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
