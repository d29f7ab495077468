"""The README's cluster recipe, for real and as written: the commands of its code block
(``source``, ``export RAY_AUTH_MODE=token``, ``ray get-auth-token``, ``ray start --head``,
``ray job submit ... prunesearch run ... --ray-address auto``, ``prunesearch status``) are
parsed out of README.md and run through bash, after a local ``ray.init`` has written
``~/.ray/auth_token`` (what ``make test`` leaves behind, and what made the recipe fail:
Ray then turns token authentication on at ``ray start --head``).

Only what must differ on a shared test machine is substituted: ``HOME`` is a temp folder
(the token is this test's own), the head gets free ports, 2 CPUs, its own temp dir and
``--block`` (so it can be stopped by its process group), ``ray job submit`` is pointed at
that head's dashboard port and told which files to upload, ``$STUDY_DB`` is a SQLite file,
and ``ray stop`` - which stops every Ray instance on the machine, the test session's too -
is replaced by stopping this head only.
"""

from __future__ import annotations

import json
import os
import re
import shlex
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


def recipe_commands(readme: str) -> list[str]:
    """The commands of the README's "## Cluster recipe" code block: continuation lines
    joined, comments and blank lines dropped."""
    section = readme.split("\n## Cluster recipe", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            commands.append(" ".join(line.split()))
    return commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, **extra: str) -> dict[str, str]:
    """This machine's environment as a user's shell would have it, with ``HOME`` the test's
    own and nothing Ray-specific set: the recipe sets what it needs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", **extra)
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


def _bash(prelude: list[str], command: str) -> list[str]:
    """``command`` run by bash after the recipe's ``source``/``export`` lines so far."""
    return ["bash", "-c", "\n".join([*prelude, command])]


def _token_file_from_ray_init(home: Path) -> Path:
    """What ``make test`` leaves behind: a local ``ray.init`` writes ``~/.ray/auth_token``."""
    code = ("import ray; ray.init(address='local', num_cpus=1, include_dashboard=False, "
            "configure_logging=False); ray.shutdown()")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(home), capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    token = home / ".ray" / "auth_token"
    assert token.is_file(), "ray.init did not write ~/.ray/auth_token: the recipe's starting point is not reproduced"
    return token


def _head_command(command: str, temp_dir: str, dashboard_port: int) -> str:
    """``ray start --head ...`` with this test's port, CPUs, temp dir and ports, and ``--block``."""
    args = shlex.split(command)
    for flag, value in (("--port", str(_free_port())), ("--num-cpus", "2")):
        assert flag in args, f"the recipe's {command!r} has no {flag}"
        args[args.index(flag) + 1] = value
    args += ["--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
             "--ray-client-server-port", str(_free_port()), "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
             # fixed by default (52365): a second Ray on the machine would leave this head
             # without a job agent ("No available agent to submit job")
             "--dashboard-agent-listen-port", str(_free_port())]
    return "exec " + shlex.join(args)


def _start_head(prelude: list[str], command: str, temp_dir: str, home: Path, dashboard_port: int):
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(_bash(prelude, _head_command(command, temp_dir, dashboard_port)), cwd=ROOT,
                            env=_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address_file = Path(temp_dir) / "ray_current_cluster"  # written once the head is up
    deadline = time.monotonic() + 180
    while not address_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            log.close()
            pytest.fail(f"ray start --head failed:\n{(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, log


def _submit(prelude: list[str], command: str, home: Path, dashboard_port: int) -> subprocess.CompletedProcess:
    """``ray job submit ...`` pointed at this head, with the upload's excludes."""
    head = "ray job submit"
    assert command.startswith(head + " "), command
    extra = ["--address", f"http://127.0.0.1:{dashboard_port}", "--runtime-env-json",
             json.dumps({"excludes": UPLOAD_EXCLUDES})]
    command = f"{head} {shlex.join(extra)} {command[len(head) + 1:]}"
    for _ in range(10):
        job = subprocess.run(_bash(prelude, command), cwd=ROOT, env=_env(home, RAY_RUNTIME_ENV_IGNORE_GITIGNORE="1"),
                             capture_output=True, text=True, timeout=420)
        # the head writes its address before its dashboard agent is up; Ray says to retry
        if "No available agent to submit job" not in job.stdout + job.stderr:
            break
        time.sleep(1.0)
    return job


def test_readme_recipe_commands():
    commands = recipe_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    kinds = [" ".join(c.split()[:2]) for c in commands]
    assert kinds == ["source .venv/bin/activate", "export RAY_AUTH_MODE=token", "ray get-auth-token",
                     "ray start", "export STUDY_DB=postgresql+psycopg2://user@dbhost/studies", "ray job",
                     "prunesearch status", "ray stop"], commands
    assert "--ray-address auto" in commands[5] and '--storage "$STUDY_DB"' in commands[5]


@pytest.mark.slow
def test_readme_cluster_recipe_as_typed(tmp_path):
    if not (ROOT / ".venv" / "bin" / "activate").is_file() or shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the recipe sources .venv/bin/activate: run `make venv`")
    from evaluators.tasks import load_task

    # the base model the quickstart prunes, trained once for the whole test suite (cached)
    config = load_config(ROOT / QUICKSTART)
    load_task(config.task.name, config.task.options, cache_dir=ROOT / config.task.cache_dir)
    # Short: Ray's unix socket paths live under the temp dir and must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="psray-", dir="/tmp")
    home = Path(tempfile.mkdtemp(prefix="pshome-", dir="/tmp"))
    _token_file_from_ray_init(home)
    # Relative storage paths resolve in the job's copy of the working dir, which is gone
    # after the job: a storage both sides see (on a real cluster: PostgreSQL).
    storage = f"sqlite:///{tmp_path}/quickstart.db"
    dashboard_port = _free_port()
    prelude: list[str] = []
    proc = log = None
    out = {}
    try:
        for command in recipe_commands((ROOT / "README.md").read_text(encoding="utf-8")):
            if command.startswith("export STUDY_DB="):
                prelude.append(f"export STUDY_DB={shlex.quote(storage)}")
            elif command.startswith(("source ", "export ")):
                prelude.append(command)
            elif command.startswith("ray start --head"):
                proc, log = _start_head(prelude, command, temp_dir, home, dashboard_port)
            elif command.startswith("ray job submit"):
                out["job"] = _submit(prelude, command, home, dashboard_port)
            elif command == "ray stop":
                pass  # stops every Ray on the machine: this head is stopped below, by its process group
            else:
                out[command.split()[1]] = subprocess.run(_bash(prelude, command), cwd=ROOT, env=_env(home),
                                                         capture_output=True, text=True, timeout=180)
    finally:
        if proc is not None:
            _stop_head(proc, temp_dir)
            log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    _check_outcome(out, storage)


def _check_outcome(out: dict[str, subprocess.CompletedProcess], storage: str) -> None:
    job = out["job"]
    text = job.stdout + job.stderr
    assert "Missing authentication token" not in text, text[-2000:]
    assert job.returncode == 0, text[-4000:]
    for name, run in out.items():  # the recipe's other commands (ray get-auth-token, status)
        assert run.returncode == 0, (name, run.stderr[-2000:])
    assert "succeeded" in text and "study quickstart: 4/4 trials finished" in text, text[-4000:]
    assert "Pareto front" in text
    # the study is there, outside the job, with the trials the job ran
    handle = open_storage(parse_storage(storage))
    try:
        trials = optuna.load_study(study_name="quickstart", storage=handle).get_trials()
    finally:
        close_storage(handle)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
    assert {t.user_attrs["searcher"] for t in trials} == {"tpe", "genetic"}
    status = out["status"]
    assert status.returncode == 0, status.stderr
    assert "quickstart" in status.stdout and "4 trials, 4 finished" in status.stdout, status.stdout
