"""Shared fixtures: one real Ray session per pytest run, small deterministic data."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that needs one (startup costs ~3 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_setup():
    """The built-in digits task (trained once, cached under studies/cache), its base model and
    ``space(ratio_min)``, a search space over it on the 0.05 grid."""
    from evaluators.tasks import load_task
    from spaces.space import SearchSpace

    task = load_task("digits", cache_dir="studies/cache")
    model = task.base_model()

    def space(ratio_min: float) -> SearchSpace:
        return SearchSpace.from_model(model, task.example_inputs, ratio_min=ratio_min, ratio_step=0.05)

    return task, model, space


@pytest.fixture(scope="session")
def digits_l1_taylor(digits_setup):
    """digits' task and base model with a space offering the l1 and taylor criteria."""
    from spaces.space import SearchSpace

    task, model, _ = digits_setup
    return task, model, SearchSpace.from_model(model, task.example_inputs, ratio_min=0.1, methods=("l1", "taylor"))
