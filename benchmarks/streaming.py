"""Streamed data: worker memory over a large image folder, and the cost of reading a split
through a DataLoader instead of in-memory tensors.

1. **Memory.** Generates an ``image-folder`` of ``--images`` PNGs (20,000 in the full run,
   32x32 RGB, 10 classes), loads it with ``load_task`` (lazy: headers only) and runs
   evaluations of random policies on an ``EvaluatorPool`` of 2 workers, each evaluation
   reading the whole validation split (a quarter of the folder) and calibration samples
   (default ``EvalSettings``: batches of 64). Each worker's growth is its peak resident
   memory (``VmHWM``) less the peak of a probe actor that imported the same modules and ran
   the same model on one batch, but holds no task; it is compared with what the decoded
   folder takes (samples x 3 x 32 x 32 float32). Also reported: the growth over the same
   pool on a folder of 200 images (what grows with the data, the evaluations' own working
   memory set aside), and, for reference, the pool on the folder decoded into in-memory
   tensors (what image-folder did before it streamed), where the workers hold the data.
2. **Throughput.** ``evaluate`` in-process on ``digits``, the in-memory splits vs the same
   splits as map-style datasets read through a ``DataLoader`` (``TensorPairs``), rounds
   alternating; the median ratio of evaluations per second is reported.

Targets (issue #19): growth < 1/4 of the decoded folder; streamed >= 0.85 x in-memory.
Writes ``benchmarks/results/streaming.json``.

    python -m benchmarks.streaming            # full run (20,000 images)
    python -m benchmarks.streaming --quick    # smoke run (2,000 images)
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.common import base_parser, result_name, setup_logging, write_result  # noqa: E402

log = logging.getLogger("benchmarks.streaming")

TARGETS = {"memory_growth_vs_decoded_max": 0.25, "streamed_vs_in_memory_min": 0.85}
SIZE, CLASSES = 32, 10


def small_cnn(num_classes: int = CLASSES):
    """The benchmark's model (``benchmarks.streaming:small_cnn``): a small BN CNN."""
    import torch.nn as nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 32), nn.Flatten(), nn.Linear(32 * 4 * 4, num_classes))


def write_folder(root: Path, images: int, seed: int = 0) -> None:
    """``images`` PNGs in ``root/<class>/``: class c brightens channel c % 3 and a c-dependent band."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(images):
        c = i % CLASSES
        arr = rng.integers(0, 120, (SIZE, SIZE, 3), dtype=np.uint8)
        arr[..., c % 3] += 100
        arr[(3 * c) % SIZE : (3 * c) % SIZE + 3] = 250
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / f"{i:06d}.png")


def _memory(pid: int) -> dict[str, float]:
    """Resident (``VmRSS``) and peak resident (``VmHWM``) MiB of process ``pid`` (Linux)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


class Probe:
    """An actor like an evaluation worker without a task: the modules and one forward pass."""

    def __init__(self):
        import torch

        import evaluators.evaluate  # noqa: F401
        import evaluators.image_folder  # noqa: F401
        from evaluators.timing import keep_freed_memory

        torch.set_num_threads(1)
        keep_freed_memory()
        with torch.no_grad():
            small_cnn().eval()(torch.randn(64, 3, SIZE, SIZE))

    def memory(self) -> dict[str, float]:
        return _memory(os.getpid())


def run_pool(task, space, policies, settings) -> dict:
    """2 workers evaluate ``policies``; their peak memory and the evaluations per second."""
    from evaluators.pool import EvaluatorPool

    with EvaluatorPool(task, groups=space.groups, settings=settings, workers=2, threads_per_worker=1) as pool:
        pool.wait_ready(timeout=600)
        start = time.perf_counter()
        for i, policy in enumerate(policies):
            pool.submit(policy, tag=i)
        metrics = []
        while pool.in_flight:
            metrics.extend(m for _, _, m in pool.results())
        wall = time.perf_counter() - start
        memory = [_memory(pid) for pid in pool.worker_pids()]
        restarts = pool.restarts
    failed = [m.error for m in metrics if not m.ok]
    if failed or restarts:
        raise RuntimeError(f"pool evaluation failed ({restarts} restarts): {failed[:1]}")
    return {"evaluations": len(metrics), "wall_s": wall, "evals_per_s": len(metrics) / wall, "workers": memory}


def _folder_task(root: Path, images: int):
    """``images`` generated images in ``root`` loaded as an image-folder task (untrained weights)."""
    import torch

    from evaluators.tasks import load_task

    write_folder(root / "images", images)
    torch.manual_seed(0)
    torch.save(small_cnn().state_dict(), root / "weights.pt")  # untrained: memory does not depend on it
    options = {"path": str(root / "images"), "model": "benchmarks.streaming:small_cnn",
               "image_size": SIZE, "weights": str(root / "weights.pt")}
    return load_task("image-folder", options, cache_dir=root / "cache")


def measure_memory(images: int, evaluations: int, eager: bool) -> dict:
    import ray

    from evaluators.datasets import read_batches
    from evaluators.pool import ensure_ray
    from evaluators.settings import EvalSettings
    from evaluators.tasks import SPLITS
    from spaces.space import SearchSpace

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        task = _folder_task(Path(tmp) / "large", images)
        load_s = time.perf_counter() - start  # writing the images and loading the task
        small = _folder_task(Path(tmp) / "small", 200)
        space = SearchSpace.from_model(task.base_model(), task.example_inputs, ratio_min=0.3)
        rng = np.random.default_rng(0)
        policies = [space.sample(rng) for _ in range(evaluations)]
        settings = EvalSettings()  # 256 calibration samples in 4 batches, the whole validation split, batches of 64
        ensure_ray(None, num_cpus=2)
        probe = ray.remote(Probe).options(num_cpus=0).remote()
        baseline = ray.get(probe.memory.remote())
        ray.kill(probe)
        decoded_mib = images * 3 * SIZE * SIZE * 4 / 2**20
        out = {"images": images, "samples": task.sample_counts(), "decoded_folder_mib": decoded_mib,
               "write_and_load_s": load_s, "probe_mib": baseline}
        runs = {"small_folder": small, "streamed": task}
        if eager:  # the folder decoded into tensors, as before: shipped whole (replace drops the spec)
            pairs = {s: tuple(read_batches(task.split(s), task.sample_count(s), seed=None)[0]) for s in SPLITS}
            runs["in_memory"] = replace(task, **pairs)
        for name, run_task in runs.items():
            result = run_pool(run_task, space, policies, settings)
            growth = [w["VmHWM"] - baseline["VmHWM"] for w in result["workers"]]
            result.update(growth_mib=growth, growth_vs_decoded=max(growth) / decoded_mib)
            out[name] = result
            log.info("%s: worker growth %s MiB of %.0f MiB decoded, %.2f evals/s", name,
                     [round(g) for g in growth], decoded_mib, result["evals_per_s"])
        small_peak = max(w["VmHWM"] for w in out["small_folder"]["workers"])
        out["streamed"]["growth_over_small_folder_mib"] = [w["VmHWM"] - small_peak for w in out["streamed"]["workers"]]
    return out


def measure_throughput(evaluations: int, repeats: int) -> dict:
    """In-process evaluations per second on digits: in-memory pairs vs the same splits as datasets."""
    from evaluators.datasets import TensorPairs
    from evaluators.evaluate import evaluate
    from evaluators.measure import model_cost
    from evaluators.settings import EvalSettings
    from evaluators.tasks import SPLITS, load_task
    from spaces.space import SearchSpace

    memory = load_task("digits")
    streamed = replace(memory, **{s: TensorPairs(*memory.split(s)) for s in SPLITS})
    space = SearchSpace.from_model(memory.base_model(), memory.example_inputs, ratio_min=0.1)
    rng = np.random.default_rng(0)
    policies = [space.sample(rng) for _ in range(evaluations)]
    settings = EvalSettings()
    base = memory.base_model()
    cost = model_cost(base, memory.example_inputs)

    def rate(task) -> float:
        start = time.perf_counter()
        for p in policies:
            m = evaluate(p, task, settings, groups=space.groups, base_model=base, base_cost=cost)
            if not m.ok:
                raise RuntimeError(m.error)
        return len(policies) / (time.perf_counter() - start)

    rate(memory), rate(streamed)  # warm-up
    rounds = [{"in_memory": rate(memory), "streamed": rate(streamed)} for _ in range(repeats)]
    ratios = [r["streamed"] / r["in_memory"] for r in rounds]
    return {"evaluations_per_round": evaluations, "rounds": rounds, "ratio_median": statistics.median(ratios),
            "settings": settings.to_dict()}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="images in the folder (default 20000, quick 2000)")
    parser.add_argument("--no-eager", action="store_true", help="skip the in-memory reference pool run")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    import torch

    torch.set_num_threads(1)
    images = args.images or (2000 if args.quick else 20000)
    if images < 40:
        parser.error(f"--images must be >= 40, got {images}")
    evaluations = 4 if args.quick else 8
    results = {"memory": measure_memory(images, evaluations, eager=not args.no_eager),
               "throughput": measure_throughput(4 if args.quick else 12, 1 if args.quick else 3)}
    memory, throughput = results["memory"], results["throughput"]
    results["targets_met"] = {
        "memory_growth_vs_decoded_max": memory["streamed"]["growth_vs_decoded"] < TARGETS["memory_growth_vs_decoded_max"],
        "streamed_vs_in_memory_min": throughput["ratio_median"] >= TARGETS["streamed_vs_in_memory_min"],
    }
    config = {"images": images, "image_size": SIZE, "classes": CLASSES, "pool_workers": 2,
              "pool_evaluations": evaluations, "targets": TARGETS, "quick": args.quick}
    path = write_result(result_name("streaming", args.quick), results, config=config, out_dir=args.out)
    print(f"worker growth {max(memory['streamed']['growth_mib']):.0f} MiB vs {memory['decoded_folder_mib']:.0f} MiB "
          f"decoded ({memory['streamed']['growth_vs_decoded']:.1%}); streamed/in-memory evals/s on digits "
          f"{throughput['ratio_median']:.3f}; -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
