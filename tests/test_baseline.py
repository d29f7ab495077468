"""The unpruned base model as the reference everywhere (#21 item 1): measured once at set-up
on the study's evaluation setting, stored in the study's user attrs, shown by run, status,
the Pareto table and pareto.png, and read back without measuring again."""

from __future__ import annotations

import dataclasses
import sys

import optuna
import pytest

import search.baseline
import search.runner
from evaluators.evaluate import evaluate_model
from search.cli import main
from search.config import load_config
from search.export import plot_pareto
from search.records import pareto_front
from search.runner import run_study
from search.setup import load_task_and_space
from search.storage import STUDY_ATTR_BASE, load_records, open_storage, parse_storage
from tests.fakes import FakePool, tiny_config


def _fake(prepared, address=None):
    return FakePool(prepared.space)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    path = tiny_config(tmp, n_trials=10)
    config = load_config(path)
    summary = run_study(config, pool_factory=_fake, progress=False)
    return config, summary


def _stored(config):
    storage = open_storage(parse_storage(config.study.storage_url), read_only=True)
    return optuna.load_study(study_name=config.name, storage=storage).user_attrs[STUDY_ATTR_BASE]


def test_the_base_is_measured_on_the_study_setting_and_stored(study):
    config, summary = study
    task, _ = load_task_and_space(config)
    expected = evaluate_model(task.base_model(), task, config.evaluation)
    base = _stored(config)  # what the dashboard and the Python API read
    assert base["accuracy"] == expected.accuracy
    assert (base["flops"], base["params"]) == (expected.flops, expected.params)
    assert base["eval_samples"] == len(task.validation[1])  # every validation sample of the tiny task
    assert summary.base == base
    # every trial's ratios are relative to this very model
    for r in load_records(config):
        if r.metrics is not None and r.metrics.flops is not None:
            assert r.metrics.flops_ratio == pytest.approx(r.metrics.flops / base["flops"])


def test_status_shows_the_base_and_each_front_trials_drop_without_measuring(study, capsys, monkeypatch):
    config, _ = study
    base = _stored(config)

    def never(*args, **kwargs):
        raise AssertionError("status measured the base model again")

    monkeypatch.setattr(search.baseline, "measure_base", never)
    monkeypatch.setattr(sys.modules["evaluators.evaluate"], "evaluate_model", never)
    assert main(["status", config.source]) == 0
    out = capsys.readouterr().out
    assert f"unpruned base model: accuracy {base['accuracy']:.4f} on {base['eval_samples']} validation samples" in out
    assert f"{base['flops'] / 1e6:.3f} MFLOPs" in out
    # which accuracy the table holds: the proxy, its recovery, on the base's very samples
    recovery = f"{config.evaluation.recovery} ({config.evaluation.calibration_samples} calibration samples)"
    assert f"(accuracy: search proxy after recovery {recovery}, on {base['eval_samples']} validation samples)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["base"][1:8] == ["(unpruned)", "-", f"{base['accuracy']:.4f}", "-", "1.0000", "1.0000",
                                 f"{base['flops'] / 1e6:.3f}"]
    front = pareto_front(load_records(config), config.study.directions)
    assert front
    for r in front:
        row = rows[str(r.number)]
        assert row[3] == f"{r.metrics.accuracy:.4f}" and row[4] == f"{base['accuracy'] - r.metrics.accuracy:+.4f}"


def test_run_summary_shows_the_base(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(search.runner, "default_pool", _fake)
    path = tiny_config(tmp_path, n_trials=4)
    assert main(["run", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    base = _stored(load_config(path))
    assert f"unpruned base model: accuracy {base['accuracy']:.4f}" in out
    assert any(line.split()[:4] == ["base", "(unpruned)", "-", f"{base['accuracy']:.4f}"]
               for line in out.splitlines() if line.strip())  # the first row of the Pareto table


def test_pareto_plot_marks_the_base(study, tmp_path, monkeypatch):
    config, _ = study
    base = _stored(config)
    records = load_records(config)
    seen = {}
    import matplotlib.figure

    original = matplotlib.figure.Figure.savefig

    def capture(fig, *args, **kwargs):
        ax = fig.axes[0]
        for collection in ax.collections:
            seen[collection.get_label()] = collection.get_offsets().tolist()
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    path = plot_pareto(records, pareto_front(records, config.study.directions), tmp_path / "pareto.png", base=base)
    assert path.stat().st_size > 0
    label = f"unpruned base ({base['accuracy']:.4f})"
    assert seen[label] == [[1.0, pytest.approx(base["accuracy"])]]


def test_measuring_the_base_reads_the_validation_split_once_and_counts_what_it_scores(tmp_path, monkeypatch):
    """A split larger than memory is decoded as it is read: one scoring pass, not a second one to count."""
    from evaluators.tasks import Task

    config = load_config(tiny_config(tmp_path, n_trials=2))
    task, _ = load_task_and_space(config)
    reads = []
    real = Task.stream
    monkeypatch.setattr(Task, "stream", lambda self, split, *a, **k: reads.append(split) or real(self, split, *a, **k))
    whole = search.baseline.measure_base(config, task)
    assert reads == ["validation"] and whole["eval_samples"] == task.sample_count("validation")
    capped = dataclasses.replace(config, evaluation=config.evaluation.replace(eval_samples=7))
    assert search.baseline.measure_base(capped, task)["eval_samples"] == 7
