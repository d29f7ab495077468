"""The README's cluster recipe, for real: a Ray head started with ``ray start --head``, the
quickstart submitted with ``ray job submit --working-dir . -- prunesearch run ...
--ray-address auto``, the study read back with ``prunesearch status``, the head stopped.

The head is this module's own (free ports, its own temp dir, its own process group), not
the test session's Ray: ``ray stop`` stops every Ray instance on the machine, so the
teardown stops only this one, by its process group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.config import load_config
from search.storage import close_storage, open_storage, parse_storage

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: ray, prunesearch
QUICKSTART = "studies/quickstart.toml"
# The upload honours .gitignore, which keeps the trained base-model cache (studies/cache)
# out; ship it, so the job does not retrain the digits model (~50 s on 2 cores), and
# exclude by hand what .gitignore would have kept out.
UPLOAD_EXCLUDES = [".venv", ".git", "**/__pycache__", ".pytest_cache", "*.egg-info", "studies/*.db",
                   "studies/*.db-*", "studies/*.journal", "studies/*.lock", "studies/exports", "studies/logs",
                   "benchmarks/results", "/.whl", "/.gl"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # As a user with the venv activated: the job's entrypoint finds `prunesearch` on PATH.
    # Token authentication explicitly off for this throw-away head: Ray >= 2.5x turns it on
    # by itself when ~/.ray/auth_token exists, and `ray job submit` then needs
    # RAY_AUTH_MODE=token (see the README's cluster recipe).
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled", **extra)
    return env


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop only this head: its process group (``ray start --block`` and every daemon it
    started), then anything still naming its temp dir (workers)."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # daemons that outlived `ray start`
    except ProcessLookupError:
        pass
    for pid in _processes_mentioning(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def ray_head():
    if shutil.which("ray", path=str(BIN)) is None or shutil.which("prunesearch", path=str(BIN)) is None:
        pytest.skip(f"ray / prunesearch not installed in {BIN} (run `make venv`)")
    # Short: Ray's unix socket paths live under it and must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="psray-", dir="/tmp")
    port, dashboard_port = _free_port(), _free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", "2",
           "--node-ip-address", "127.0.0.1", "--port", str(port), "--temp-dir", temp_dir,
           "--ray-client-server-port", str(_free_port()), "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
           # fixed by default (52365): a second Ray on the machine would leave this head
           # without a job agent ("No available agent to submit job")
           "--dashboard-agent-listen-port", str(_free_port())]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address_file = Path(temp_dir) / "ray_current_cluster"  # written once the head is up
        deadline = time.monotonic() + 180
        while not address_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head failed:\n{(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield {"dashboard": f"http://127.0.0.1:{dashboard_port}", "gcs": address_file.read_text().strip()}
    finally:
        _stop_head(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_quickstart_as_a_ray_job(ray_head, tmp_path):
    from evaluators.tasks import load_task

    # the base model the quickstart prunes, trained once for the whole test suite (cached)
    config = load_config(ROOT / QUICKSTART)
    load_task(config.task.name, config.task.options, cache_dir=ROOT / config.task.cache_dir)
    # Relative storage paths resolve in the job's copy of the working dir, which is gone
    # after the job: give the study a storage both sides see (on a real cluster: PostgreSQL).
    storage = f"sqlite:///{tmp_path}/quickstart.db"
    runtime_env = json.dumps({"excludes": UPLOAD_EXCLUDES})
    submit = [str(BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", ".",
              "--runtime-env-json", runtime_env, "--",
              "prunesearch", "run", QUICKSTART, "--n-trials", "4", "--ray-address", "auto",
              "--storage", storage, "--no-progress"]
    start = time.monotonic()
    for _ in range(10):
        job = subprocess.run(submit, cwd=ROOT, env=_env(RAY_RUNTIME_ENV_IGNORE_GITIGNORE="1"), capture_output=True,
                             text=True, timeout=420)
        out = job.stdout + job.stderr
        # the head writes its address before its dashboard agent is up; Ray says to retry
        if "No available agent to submit job" not in out:
            break
        time.sleep(1.0)
    elapsed = time.monotonic() - start
    assert job.returncode == 0, out[-4000:]
    assert "succeeded" in out and "study quickstart: 4/4 trials finished" in out, out[-4000:]
    assert "Pareto front" in out

    # the study is there, outside the job, with the trials the job ran
    spec = parse_storage(storage)
    handle = open_storage(spec)
    try:
        trials = optuna.load_study(study_name="quickstart", storage=handle).get_trials()
    finally:
        close_storage(handle)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
    assert {t.user_attrs["searcher"] for t in trials} == {"tpe", "genetic"}
    status = subprocess.run([sys.executable, "-m", "search", "status", QUICKSTART, "--storage", storage], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "4 trials, 4 finished of n_trials 40" in status.stdout
    print(f"ray job submit -> 4 trials in {elapsed:.1f} s")
