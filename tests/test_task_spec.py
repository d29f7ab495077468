"""TaskSpec: a loaded task can be built again from what it was loaded from (the Ray workers
build their own copy from it, so no dataset travels through the object store)."""

from __future__ import annotations

import pickle
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from evaluators.tasks import SPLITS, TaskSpec, load_task

CACHE = Path(__file__).resolve().parents[1] / "studies" / "cache"

PLUGIN = '''
from pathlib import Path

from tests.fakes import tiny_task

SEEN = []


def make(cache_dir, samples: int = 32):
    SEEN.append(Path(cache_dir))
    return tiny_task(samples=samples)
'''


def _same_data(a, b) -> None:
    for split in SPLITS:
        (xa, ya), (xb, yb) = a.split(split), b.split(split)
        assert torch.equal(xa, xb) and torch.equal(ya, yb), split
    assert torch.equal(a.example_inputs, b.example_inputs)


def test_load_task_records_its_spec_and_the_spec_builds_the_same_task():
    task = load_task("digits", cache_dir=CACHE)
    spec = task.spec
    assert spec == TaskSpec("digits", {}, str(CACHE), str(Path.cwd()))
    again = pickle.loads(pickle.dumps(spec)).load()
    _same_data(task, again)
    assert all(torch.equal(v, again.base_state[k]) for k, v in task.base_state.items())
    # the spec is a few hundred bytes; the task it builds holds every split
    assert len(pickle.dumps(spec)) < 1_000 < len(pickle.dumps(task)) // 100


def test_spec_options_are_a_copy_and_a_plugin_builds_again_with_them():
    options = {"samples": 20, "seed": 3}
    task = load_task("tests.fakes:tiny_task", options)
    options["samples"] = 99  # the caller's dict changing later does not change the spec
    assert dict(task.spec.options) == {"samples": 20, "seed": 3}
    again = task.spec.load()
    assert again.sample_counts() == {"train": 20, "calibration": 20, "validation": 20}
    _same_data(task, again)


def test_replace_drops_the_spec():
    """A task whose splits were replaced is no longer what its spec builds."""
    task = load_task("tests.fakes:tiny_task", {"samples": 8})
    x, y = task.validation
    assert replace(task, validation=(x[:4], y[:4])).spec is None


def test_spec_load_uses_the_given_weights_and_checks_the_sample_counts():
    task = load_task("tests.fakes:tiny_task", {"samples": 8})
    weights = {k: torch.zeros_like(v) for k, v in task.base_state.items()}
    again = task.spec.load(weights, task.sample_counts())
    assert all(not v.any() for v in again.base_state.values())
    with pytest.raises(ValueError, match=r"task 'tests.fakes:tiny_task' built here has samples .* not .*'train': 9"):
        task.spec.load(None, {**task.sample_counts(), "train": 9})


def test_spec_of_a_plugin_beside_the_study_loads_from_another_directory(tmp_path, monkeypatch):
    """Where a Ray worker runs: another working directory, the plugin's directory not on its
    path; the spec's workdir makes the module importable and resolves a relative cache_dir."""
    study = tmp_path / "study"
    study.mkdir()
    (study / "spec_plugin_beside.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.chdir(study)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(study))])
    monkeypatch.delitem(sys.modules, "spec_plugin_beside", raising=False)
    task = load_task("spec_plugin_beside:make", {"samples": 8}, cache_dir="cache")
    assert task.spec.workdir == str(study) and task.spec.cache_dir == "cache"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(study)])
    monkeypatch.delitem(sys.modules, "spec_plugin_beside")
    again = task.spec.load()
    _same_data(task, again)
    import spec_plugin_beside

    assert spec_plugin_beside.SEEN == [study / "cache"]


def test_a_shipped_task_carries_no_data_and_is_rebuilt_alike(tmp_path):
    """What the masking searcher's Ray tasks receive: the spec and weights, not the splits."""
    import pickle

    import torch

    from evaluators.tasks import load_task, shipped, unshipped

    options = {"n_samples": 400, "epochs": 1, "dim": 16, "heads": 2, "head_dim": 4, "hidden": 16, "depth": 1}
    task = load_task("tokens", options, cache_dir=tmp_path)
    payload = shipped(task)
    weights = sum(t.numel() * t.element_size() for t in task.base_state.values())
    assert len(pickle.dumps(payload)) < weights + 20_000 < len(pickle.dumps(task))
    again = unshipped(payload)
    assert again.sample_counts() == task.sample_counts()
    assert torch.equal(again.batches("validation", 64, seed=None)[0][0], task.batches("validation", 64, seed=None)[0][0])
    assert unshipped(shipped(again)) is not again and unshipped((task, None, None)) is task
