"""The two worked examples of tasks with their own metric, loss and inputs, end to end
(#19 item 2): a study (in-process evaluation, as tests/test_attention_study.py), ``prunesearch
status``, ``prunesearch export``, the export reloaded and scored again, and optuna-dashboard's
REST API naming the objectives by the task's metric names.

* ``masks``: dense prediction (one logit per pixel), ``objectives = ["iou", "flops"]``,
  ``[constraints] max_mse``; BCE loss.
* ``markov-lm``: a causal language model on dict inputs (``input_ids``, ``attention_mask``),
  ``objectives = ["perplexity", "flops"]`` (both minimised), ``[constraints] max_perplexity``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from evaluators.measure import task_values
from search.cli import main
from search.config import load_config
from search.export import load_exported
from search.runner import run_study
from search.setup import load_task_and_space
from search.storage import load_records
from tests.fakes import local_pool, write_config
from tests.test_dashboard import ROOT, free_port, get_json, stop_server

EXAMPLES = {
    "masks": dict(options="n_samples = 500\nepochs = 4", objectives=["iou", "flops"],
                  bound=("max_mse", 0.2), metrics={"iou", "mse"}),
    "markov-lm": dict(options="n_samples = 800\nepochs = 3", objectives=["perplexity", "flops"],
                      bound=("max_perplexity", 12.0), metrics={"perplexity"}),
}


@pytest.fixture(scope="module", params=sorted(EXAMPLES))
def study(request, tmp_path_factory):
    name = request.param
    example = EXAMPLES[name]
    tmp = tmp_path_factory.mktemp(name)
    key, bound = example["bound"]
    path = write_config(tmp / "study.toml", f"""
        [study]
        name = "{name}-study"
        storage = "sqlite:///{tmp}/study.db"
        n_trials = 8
        seed = 0
        objectives = {json.dumps(example["objectives"])}
        log_file = "{tmp}/study.log"

        [task]
        name = "{name}"
        cache_dir = "{tmp}/cache"

        [task.options]
        {example["options"]}

        [space]
        ratio_min = 0.3
        ratio_step = 0.1

        [evaluation]
        calibration_samples = 64
        bn_batches = 2
        batch_size = 64
        eval_samples = 192

        [constraints]
        max_flops_ratio = 0.9
        {key} = {bound}

        [export]
        dir = "{tmp}/exports"

        [[searchers]]
        kind = "random"
        [[searchers]]
        kind = "tpe"
        """)
    config = load_config(path)
    run_study(config, pool_factory=lambda p, a: local_pool(p.task, p.space, config.evaluation), progress=False)
    return name, example, config, tmp


def test_every_trial_records_the_task_metrics(study):
    name, example, config, _ = study
    records = [r for r in load_records(config) if r.metrics is not None]
    assert len(records) == 8
    key = example["bound"][0]
    metric = example["objectives"][0]
    for r in records:
        assert r.metrics.error is None, r.metrics.error
        assert set(r.metrics.values) == example["metrics"] and r.metrics.accuracy is None
        assert r.values == pytest.approx((r.metrics.values[metric], r.metrics.flops_ratio))
        assert set(r.constraints) == {"max_flops_ratio", key}
        measured = r.metrics.values[key.removeprefix("max_")]
        assert r.constraints[key] == pytest.approx(measured - example["bound"][1])
    # pruning harder costs quality: the metric is measured, not a constant
    assert len({round(r.metrics.values[metric], 6) for r in records}) > 1


def test_status_shows_the_metric_names(study, capsys):
    name, example, config, _ = study
    assert main(["status", config.source]) == 0
    out = capsys.readouterr().out
    for metric in example["metrics"]:
        assert metric in out.split("unpruned base model: ")[1].splitlines()[0]  # the base line names it
    table = out[out.index("Pareto front ("):]
    header = table.splitlines()[2].split()
    assert set(example["metrics"]) <= set(header) and "accuracy" not in header
    assert table.splitlines()[4].split()[0] == "base"


def test_export_reloads_and_scores_as_recorded(study, capsys):
    name, example, config, tmp = study
    assert main(["export", config.source]) == 0
    out = capsys.readouterr().out
    metric = example["objectives"][0]
    assert f"proxy {metric} " in out
    task, _ = load_task_and_space(config)
    directories = sorted((tmp / "exports" / config.name).glob("trial-*"))
    assert directories
    for directory in directories:
        info = json.loads((directory / "metrics.json").read_text())
        assert set(info["exported"]["values"]) == example["metrics"]
        assert set(info["drop"]["changes"]) == example["metrics"]
        recorded = info["recorded"]["values"]
        assert info["remeasured"]["values"] == pytest.approx(recorded, rel=1e-5)
        model = load_exported(directory, task)
        batches = task.batches("validation", config.evaluation.batch_size, limit=config.evaluation.eval_samples,
                               seed=None)
        assert task_values(model, task, batches) == pytest.approx(info["exported"]["values"], rel=1e-5)
        program = torch.export.load(str(directory / "model.pt2")).module()
        inputs = batches[0][0]
        with torch.no_grad():
            want = model(**inputs) if isinstance(inputs, dict) else model(inputs)
            got = program(**inputs) if isinstance(inputs, dict) else program(inputs)
        assert torch.allclose(got, want, atol=1e-5)


def test_dashboard_names_the_objectives_by_the_task_metrics(study):
    _, example, config, _ = study
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "search", "dashboard", config.source, "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        import time

        deadline = time.monotonic() + 60
        studies = get_json(f"http://127.0.0.1:{port}/api/studies", deadline, proc)["study_summaries"]
        (summary,) = [s for s in studies if s["study_name"] == config.name]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", deadline, proc)
        assert detail["objective_names"] == example["objectives"]
        trial = next(t for t in detail["trials"] if t["state"] == "Complete")
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        metrics = json.loads(attrs["metrics"]) if isinstance(attrs["metrics"], str) else attrs["metrics"]
        assert set(metrics["values"]) == example["metrics"]
    finally:
        stop_server(proc)
