"""Ray GPU scheduling of the evaluation workers, on a machine without GPUs.

Ray schedules by declared resources: a Ray started with ``num_gpus=2`` hands out GPU ids
0 and 1 whether or not the GPUs exist, so the scheduling is tested here with declared
GPUs: ``gpus_per_worker = 1`` gives each worker its own id and a third worker waits;
``0.5`` puts exactly two workers on each id. ``prunesearch run`` with ``gpus_per_worker``
on a machine without CUDA declares the GPUs its workers ask for, so the study runs (its
workers evaluate on the CPU: ``device = "auto"``).

Each check runs in a fresh Python (its own Ray): the test session's Ray has no GPUs and
must not be restarted under the other tests.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="declares GPUs that do not exist: CPU-only machines")


def _in_fresh_python(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


POOLS = """
import json, ray, torch
from evaluators.pool import EvaluatorPool
from evaluators.settings import EvalSettings
from tests.fakes import tiny_space, tiny_task

torch.set_num_threads(1)
ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False,
         configure_logging=False)
task, space = tiny_task(), tiny_space()
settings = EvalSettings(calibration_samples=32, bn_batches=2, batch_size=32)
out = {}
def pool(workers, gpus):
    return EvaluatorPool(task, groups=space.groups, settings=settings, workers=workers, gpus_per_worker=gpus)
p = pool(2, 1)
out["whole"] = p.worker_gpu_ids()
p.submit(space.uniform(0.5), tag="t")
out["metrics"] = [(tag, m.ok, m.error) for tag, _, m in p.results(timeout=120)]
p.close()
p = pool(4, 0.5)
out["half"] = p.worker_gpu_ids()
p.close()
p = pool(3, 1)
try:
    p.wait_ready(timeout=8)
    out["third"] = "started"
except TimeoutError:
    out["third"] = "waits"
p.close()
print("RESULT " + json.dumps(out, default=str))
"""


def test_workers_get_distinct_gpus_and_share_one_only_by_fraction():
    run = _in_fresh_python(POOLS)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    whole = [tuple(map(str, ids)) for ids in out["whole"]]
    assert sorted(whole) == [("0",), ("1",)]                      # one GPU each, distinct
    assert out["metrics"] == [["t", True, None]]                  # a GPU-holding worker evaluates (here on the CPU)
    half = collections.Counter(str(i) for ids in out["half"] for i in ids)
    assert all(len(ids) == 1 for ids in out["half"]) and half == {"0": 2, "1": 2}  # two per GPU at 0.5
    assert out["third"] == "waits"                                # no third worker squeezed onto a taken GPU


RUN = """
import sys
from search.cli import main
sys.exit(main(["run", sys.argv[1], "--no-progress"]))
"""


def test_prunesearch_run_declares_the_gpus_its_workers_ask_for(tmp_path):
    from tests.fakes import tiny_config

    path = tiny_config(tmp_path, n_trials=4)
    path.write_text(path.read_text().replace("n_trials = 4", "n_trials = 4\nworkers = 2\ngpus_per_worker = 0.5"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0")
    # Without the declared GPU the two actors (0.5 GPU each) would never be scheduled and
    # the run would stall; the timeout turns that into a failure.
    run = subprocess.run([sys.executable, "-c", RUN, str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "study tiny: 4/4 trials finished" in run.stdout, run.stdout
