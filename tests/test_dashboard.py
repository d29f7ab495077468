"""`prunesearch dashboard` serves the study through optuna-dashboard's REST API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from search.config import load_config
from search.runner import run_study
from tests.fakes import FakePool, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a dashboard started in its own process group (SIGTERM, then SIGKILL after 10 s)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def get_json(url: str, deadline: float, proc: subprocess.Popen):
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"dashboard exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_dashboard_serves_trials_with_user_attrs(tmp_path):
    searchers = """
    [[searchers]]
    kind = "tpe"
    [[searchers]]
    kind = "genetic"
    [searchers.options]
    population = 4
    """
    path = tiny_config(tmp_path, n_trials=10, searchers=searchers)
    config = load_config(path)
    run_study(config, pool_factory=lambda p, a: FakePool(p.space), progress=False)

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "search", "dashboard", str(path), "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        studies = get_json(f"http://127.0.0.1:{port}/api/studies", deadline, proc)["study_summaries"]
        match = [s for s in studies if s["study_name"] == config.name]
        assert len(match) == 1
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{match[0]['study_id']}", deadline, proc)
        trials = detail["trials"]
        # the unpruned base model's metrics are on the study, for the dashboard's users too
        study_attrs = {a["key"]: a["value"] for a in detail["user_attrs"]}
        base = study_attrs["base"]
        base = json.loads(base) if isinstance(base, str) else base
        assert base["accuracy"] is not None and base["flops"] > 0
        assert len(trials) == 10
        searchers_seen = set()
        for t in trials:
            attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
            assert {"searcher", "generation", "fidelity", "policy", "metrics"} <= set(attrs)
            searchers_seen.add(attrs["searcher"])
            assert t["state"] == "Complete"
            assert {p["name"] for p in t["params"]} >= {"fc1", "features.0.0"}
        assert searchers_seen == {"tpe", "genetic"}
    finally:
        stop_server(proc)
