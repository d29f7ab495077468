"""Export of the Pareto front, and the end-to-end path: real Ray, real SQLite, digits."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import optuna
import pytest
import torch

from evaluators.evaluate import evaluate_model
from search.cli import main
from search.config import load_config
from search.export import MARKER, load_exported, load_pruned
from search.runner import run_study
from search.setup import load_task_and_space
from search.records import pareto_front, read_trials
from search.storage import inspect_storage, parse_storage
from tests.fakes import FakePool, local_pool, tiny_config

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "studies" / "cache"  # the digits base model is trained once and shared

optuna.logging.set_verbosity(optuna.logging.WARNING)


def records_of(config):
    with inspect_storage(parse_storage(config.study.storage_url)) as storage:
        return read_trials(optuna.load_study(study_name=config.name, storage=storage))


# -- end to end: `prunesearch run` + `prunesearch export` on digits with real Ray ----------------
E2E = """
[study]
name = "e2e"
storage = "sqlite:///{tmp}/e2e.db"
n_trials = 10
workers = 2
seed = 0
log_file = "{tmp}/e2e.log"

[task]
name = "digits"
cache_dir = "{cache}"

[space]
ratio_min = 0.3
ratio_max = 0.8
ratio_step = 0.1

[evaluation]
recovery = "adaptive_bn"
calibration_samples = 128
bn_batches = 2

[constraints]
max_flops_ratio = 0.7

[[searchers]]
kind = "tpe"
[searchers.options]
n_startup_trials = 4

[[searchers]]
kind = "genetic"
[searchers.options]
population = 4
top_k = 1
sensitivity_ratios = []

[export]
dir = "{tmp}/exports"
formats = []   # torch.export of digits costs seconds per trial: checked on the tiny task below
"""


@pytest.fixture(scope="module")
def e2e(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    path = tmp / "e2e.toml"
    path.write_text(textwrap.dedent(E2E).format(tmp=tmp, cache=CACHE))
    assert main(["run", str(path), "--no-progress"]) == 0
    assert main(["export", str(path)]) == 0
    return load_config(path), tmp


def test_e2e_trials_complete_and_the_front_is_feasible(e2e):
    config, _ = e2e
    records = records_of(config)
    assert len(records) == 10
    assert all(r.state == optuna.trial.TrialState.COMPLETE for r in records)
    assert {r.searcher for r in records} == {"tpe", "genetic"}
    front = pareto_front(records, config.study.directions)
    assert front
    for r in front:
        assert r.fidelity == "full" and r.feasible
        assert r.metrics.flops_ratio <= 0.7 and 0 < r.metrics.accuracy <= 1


def test_e2e_export_reloads_to_the_recorded_accuracy(e2e):
    config, tmp = e2e
    out = tmp / "exports" / "e2e"
    front = pareto_front(records_of(config), config.study.directions)
    assert sorted(p.name for p in out.glob("trial-*")) == sorted(f"trial-{r.number}" for r in front)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / MARKER).is_file()
    task, space = load_task_and_space(config)
    settings = config.evaluation.replace(threads=config.study.threads_per_worker)
    for r in front:
        d = out / f"trial-{r.number}"
        assert {"policy.json", "metrics.json", "weights.pt"} <= {p.name for p in d.iterdir()}
        state = torch.load(d / "weights.pt", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        model = load_exported(d, task, groups=space.groups)
        measured = evaluate_model(model, task, settings)
        assert measured.accuracy == pytest.approx(r.metrics.accuracy, abs=1e-12)
        assert measured.flops == pytest.approx(r.metrics.flops)
        info = json.loads((d / "metrics.json").read_text())
        assert info["recorded"]["accuracy"] == r.metrics.accuracy == info["remeasured"]["accuracy"]


def test_e2e_status(e2e, capsys):
    config, tmp = e2e
    assert main(["status", config.source]) == 0
    out = capsys.readouterr().out
    assert "10 finished of n_trials 10" in out and "Pareto front (" in out


# -- export on the tiny task (real in-process evaluation, no Ray) --------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny-export")
    config = load_config(tiny_config(tmp, n_trials=8, extra="finetune_steps = 2"))
    run_study(config, pool_factory=lambda p, a: local_pool(p.task, p.space, config.evaluation), progress=False)
    return config, tmp


def test_export_finetune_pt2_and_reexport(tiny, capsys):
    config, tmp = tiny
    assert main(["export", config.source]) == 0
    out = tmp / "exports" / "tiny"
    dirs = sorted(out.glob("trial-*"))
    assert dirs
    task, space = load_task_and_space(config)
    base = evaluate_model(task.base_model(), task, config.evaluation)  # the unpruned model, measured here
    printed = capsys.readouterr().out
    assert f"unpruned base model: accuracy {base.accuracy:.4f}" in printed
    for d in dirs:
        info = json.loads((d / "metrics.json").read_text())
        assert info["export_finetune_steps"] == 2
        assert info["base"]["accuracy"] == base.accuracy and info["base"]["flops"] == base.flops
        exported = info["exported"]
        assert info["drop"]["accuracy_drop"] == pytest.approx(base.accuracy - exported["accuracy"], abs=1e-12)
        assert info["drop"]["flops_ratio"] == pytest.approx(exported["flops"] / base.flops)
        assert info["drop"]["params_ratio"] == pytest.approx(exported["params"] / base.params)
        assert f"trial-{info['trial']}: " in printed and f"drop vs base {info['drop']['accuracy_drop']:+.4f}" in printed
        assert info["exported_fidelity"] == "after 2 export fine-tune steps"
        assert f"exported {exported['accuracy']:.4f} after 2 export fine-tune steps" in printed
        assert info["remeasured"]["accuracy"] == info["recorded"]["accuracy"]
        model = load_exported(d, task, groups=space.groups)
        measured = evaluate_model(model, task, config.evaluation)
        assert measured.accuracy == pytest.approx(info["exported"]["accuracy"], abs=1e-12)
        # a deployer's load: the directory and the model factory alone, no task or data
        alone = load_pruned(d, task.build_model)
        assert evaluate_model(alone, task, config.evaluation).accuracy == measured.accuracy
        with torch.no_grad():
            assert torch.equal(alone(task.validation[0][:16]), model(task.validation[0][:16]))
        assert [row["batch"] for row in info["latency"]] == sorted({1, config.latency.batch})
        for row in info["latency"]:
            assert row["latency_ms"] > 0 and row["latency_ratio"] == pytest.approx(row["latency_ms"] / row["base_latency_ms"])
        assert info["files"] == sorted(p.name for p in d.iterdir())  # every file, listed
        program = torch.export.load(str(d / "model.pt2"))  # batch dimension is dynamic
        for batch in (1, 5):
            x = task.validation[0][:batch]
            with torch.no_grad():
                assert torch.allclose(program.module()(x), model(x), atol=1e-5)
    # exporting again over a previous export replaces it
    (dirs[0] / "stale.txt").write_text("old")
    assert main(["export", config.source, "--finetune-steps", "0"]) == 0
    assert not (dirs[0] / "stale.txt").exists()
    again = json.loads((dirs[0] / "metrics.json").read_text())
    assert again["export_finetune_steps"] == 0
    assert again["exported_fidelity"].startswith("= the search proxy (no export fine-tune")
    assert again["exported"]["accuracy"] == again["remeasured"]["accuracy"]
    assert "= the search proxy (no export fine-tune" in capsys.readouterr().out


def test_export_refuses_a_foreign_directory(tiny, capsys):
    config, tmp = tiny
    foreign = tmp / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export", config.source, "--out", str(foreign)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunesearch: error: ") and "not a prunesearch export" in err and "\n" not in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@pytest.mark.skipif(importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxscript") is not None,
                    reason="onnx is installed")
def test_export_onnx_without_onnx_is_a_clear_error(tiny, capsys):
    config, tmp = tiny
    assert main(["export", config.source, "--formats", "pt2,onnx", "--out", str(tmp / "onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "onnx" in err and "pip install" in err
    assert not (tmp / "onnx").exists()


def test_load_pruned_keeps_the_space_s_ignored_layers(tmp_path, capsys):
    """A space that never prunes some layer: the factory's model is pruned the same way."""
    path = tiny_config(tmp_path, n_trials=4, space='ignored = ["features.1.0"]')
    config = load_config(path)
    run_study(config, pool_factory=lambda p, a: FakePool(p.space), progress=False)
    assert main(["export", str(path)]) == 0
    task, space = load_task_and_space(config)
    assert "features.1.0" not in {g.name for g in space.groups}
    dirs = sorted((tmp_path / "exports" / "tiny").glob("trial-*"))
    assert dirs
    for d in dirs:
        x = task.validation[0][:8]
        with torch.no_grad():
            assert torch.equal(load_pruned(d, task.build_model)(x), load_exported(d, task, groups=space.groups)(x))
