"""The dashboard tells the truth (#21 item 2, the parts in the dashboard command and the
study's set-up): its REST API's best trials are `status`'s feasible front on a study with
infeasible trials, and the objectives carry their names."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna_dashboard._pareto_front import get_pareto_front_trials

from search.config import load_config
from search.records import pareto_front
from search.runner import run_study
from search.storage import load_records, open_storage, parse_storage
from tests.fakes import FakePool, tiny_config
from tests.test_dashboard import free_port, get_json, stop_server

ROOT = Path(__file__).resolve().parents[1]


def test_dashboard_best_trials_are_the_feasible_front(tmp_path):
    path = tiny_config(tmp_path, n_trials=16, constraints="max_flops_ratio = 0.4")
    config = load_config(path)
    run_study(config, pool_factory=lambda p, a: FakePool(p.space), progress=False)
    records = load_records(config)
    front = {r.number for r in pareto_front(records, config.study.directions)}
    assert front
    # what optuna-dashboard computes by itself: it ignores constraints
    storage = open_storage(parse_storage(config.study.storage_url), read_only=True)
    study = optuna.load_study(study_name=config.name, storage=storage)
    own = {t.number for t in get_pareto_front_trials(study.trials, study.directions)}
    infeasible = {r.number for r in records if not r.feasible}
    assert own & infeasible  # the study has infeasible trials the dashboard alone would call best

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "search", "dashboard", str(path), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        studies = get_json(f"http://127.0.0.1:{port}/api/studies", deadline, proc)["study_summaries"]
        (summary,) = [s for s in studies if s["study_name"] == config.name]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", deadline, proc)
        assert {t["number"] for t in detail["best_trials"]} == front
        assert not {t["number"] for t in detail["best_trials"]} & infeasible
        assert detail["objective_names"] == list(config.study.objectives)  # not "0" / "1"
    finally:
        stop_server(proc)
