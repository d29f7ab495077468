"""Latency as an objective and a constraint: lookup-table latency during search, real at export."""

from __future__ import annotations

import json

import optuna
import pytest

from search.cli import main
from search.config import ConfigError, load_config
from search.export import export_study
from search.runner import run_study
from search.records import pareto_front, read_trials
from tests.fakes import FakePool, tiny_config

LATENCY = "\n[latency]\nbatch = 8\nruns = 10\nwarmup = 2\nlevels = [0.5]\n"


@pytest.fixture(autouse=True)
def deterministic_timer(monkeypatch):
    """Time models by their FLOPs: these tests check how the runner uses the table, not the
    machine's noise (tests/test_latency.py and benchmarks/latency.py measure for real)."""
    from evaluators import timing
    from spaces.cost import count_cost

    def fake(model, inputs, **kwargs):
        return count_cost(model, inputs[:1]).flops / 1e5

    def fake_paired(model, reference, inputs, **kwargs):
        return fake(model, inputs), fake(reference, inputs)

    monkeypatch.setattr(timing, "measure_latency_ms", fake)
    monkeypatch.setattr(timing, "measure_paired_ms", fake_paired)


def latency_config(tmp, constraints="max_latency_ratio = 0.6", latency=LATENCY, name="lat"):
    path = tiny_config(tmp, name=name, n_trials=10, constraints=constraints)
    text = path.read_text().replace('seed = 0\n', 'seed = 0\nobjectives = ["accuracy", "latency_ms"]\n', 1)
    path.write_text(text + latency)
    return path


def test_latency_constraint_holds_on_the_front_and_export_measures_real_latency(tmp_path):
    config = load_config(latency_config(tmp_path))
    run_study(config, pool_factory=lambda p, a: FakePool(p.space), progress=False)
    study = optuna.load_study(study_name="lat", storage=config.study.storage_url)
    records = read_trials(study)
    assert all(r.metrics.latency_ms is not None and r.metrics.latency_ratio is not None for r in records if r.values)
    front = pareto_front(records, config.study.directions)
    assert front
    for r in front:
        assert r.metrics.latency_ratio <= 0.6 + 1e-9
        assert r.values[1] == pytest.approx(r.metrics.latency_ms)
    infeasible = [r for r in records if r.values and r.metrics.latency_ratio > 0.6]
    assert infeasible and all(not r.feasible for r in infeasible)
    summary = export_study(config, out=tmp_path / "exports" / "lat")
    for directory in summary.directories:
        info = json.loads((directory / "metrics.json").read_text())
        assert info["exported"]["latency_ms"] > 0          # measured on the real pruned model
        assert info["recorded"]["latency_ms"] > 0          # lookup-table prediction during search


def test_latency_table_is_cached_across_runs(tmp_path):
    config = load_config(latency_config(tmp_path, name="lat2"))
    run_study(config.with_overrides(n_trials=2), pool_factory=lambda p, a: FakePool(p.space), progress=False)
    tables = list((tmp_path / "cache").glob("latency-*.json"))
    assert len(tables) == 1
    mtime = tables[0].stat().st_mtime_ns
    run_study(config.with_overrides(n_trials=4), pool_factory=lambda p, a: FakePool(p.space), progress=False)
    assert tables[0].stat().st_mtime_ns == mtime


def test_latency_ratio_without_table_is_refused(tmp_path, capsys):
    path = latency_config(tmp_path, latency="\n[latency]\ntable = false\n")
    assert main(["run", str(path), "--no-progress"]) == 2
    assert "[latency] table" in capsys.readouterr().err


def test_bad_latency_section_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="latency"):
        load_config(latency_config(tmp_path, latency="\n[latency]\nthreads = 0\n"))


def test_latency_ratio_measured_in_every_evaluation(tmp_path):
    """Without a table, each evaluation times the pruned model against the unpruned one and
    ``latency_ratio`` is the objective; the ratio constraint holds on the front."""
    from evaluators.evaluate import evaluate

    path = tiny_config(tmp_path, name="measured", n_trials=8, constraints="max_latency_ratio = 0.8")
    text = path.read_text().replace('seed = 0\n', 'seed = 0\nobjectives = ["accuracy", "latency_ratio"]\n', 1)
    text = text.replace("batch_size = 32\n", "batch_size = 32\nmeasure_latency = true\n", 1)
    path.write_text(text + "\n[latency]\ntable = false\nruns = 2\n")
    config = load_config(path)

    def pool(p, _):
        return FakePool(p.space, evaluate=lambda policy, settings: evaluate(
            policy, p.task, settings or config.evaluation, groups=p.space.groups))

    run_study(config, pool_factory=pool, progress=False)
    records = [r for r in read_trials(optuna.load_study(study_name="measured", storage=config.study.storage_url))
               if r.values]
    assert len(records) == 8
    for r in records:  # the fake clock charges FLOPs: the paired ratio is the FLOPs ratio
        assert r.values[1] == pytest.approx(r.metrics.latency_ratio)
        assert r.metrics.latency_ratio == pytest.approx(r.metrics.flops_ratio, rel=1e-6)
    front = pareto_front(records, config.study.directions)
    assert front and all(r.metrics.latency_ratio <= 0.8 + 1e-9 for r in front)


def test_a_study_recorded_before_latency_moved_to_its_own_table_still_resumes(tmp_path):
    """Studies store their evaluation settings; those written while ``latency_batch`` and
    ``latency_runs`` were ``[evaluation]`` keys (and without ``latency``) must resume."""
    config = load_config(latency_config(tmp_path, name="old"))
    run_study(config.with_overrides(n_trials=2), pool_factory=lambda p, a: FakePool(p.space), progress=False)
    study = optuna.load_study(study_name="old", storage=config.study.storage_url)
    stored = dict(study.user_attrs["evaluation"])
    stored.pop("latency")
    study.set_user_attr("evaluation", {**stored, "latency_batch": 1, "latency_runs": 20})
    run_study(config.with_overrides(n_trials=4), pool_factory=lambda p, a: FakePool(p.space), progress=False)
    assert len(optuna.load_study(study_name="old", storage=config.study.storage_url).trials) == 4
