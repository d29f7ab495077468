"""Small frictions of the command line (#21 item 7): --version, help on every argument, a
closed stdout pipe, the dashboard's port, plugins beside the study, Ray's token notice."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest

import search.cli as cli
from evaluators.tasks import load_task
from search.cli import build_parser, main
from search.config import load_config
from search.runner import run_study
from tests.fakes import FakePool, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"prunesearch {version('prunesearch')}"


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_argument_has_help():
    parser = build_parser()
    commands = dict(_subparsers(parser))
    assert {"run", "status", "describe", "export", "verify", "dashboard"} <= set(commands)
    missing = [f"{name} {a.dest}" for name, sub in [("prunesearch", parser), *commands.items()]
               for a in sub._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and (not a.help or a.help == argparse.SUPPRESS)]
    assert not missing


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frictions")
    path = tiny_config(tmp, n_trials=6)
    run_study(load_config(path), pool_factory=lambda p, a: FakePool(p.space), progress=False)
    return tmp, path


def test_status_into_a_closed_pipe_is_quiet(study):
    """`prunesearch status ... | head`: the reader goes away; no BrokenPipeError, no traceback."""
    tmp, path = study
    proc = subprocess.Popen([sys.executable, "-m", "search", "status", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has even started: every write meets a closed pipe
    _, err = proc.communicate(timeout=120)
    assert err.decode() == ""
    assert proc.returncode == 141
    log = tmp / "tiny.log"
    assert not log.exists() or "BrokenPipeError" not in log.read_text()
    # and through a shell's `| head`, the way users meet it
    shell = subprocess.run(f"{sys.executable} -m search status {path} | head -1", shell=True, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert shell.stdout.startswith("study tiny") and shell.stderr == ""


def test_dashboard_refuses_a_port_in_use_before_announcing_itself(study, capsys):
    _, path = study
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["dashboard", str(path), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"cannot serve on 127.0.0.1:{port}" in lines[0] and "choose another --port" in lines[0]
    assert out == ""  # nothing announced "Listening on" / the dashboard URL


PLUGIN = '''
from pathlib import Path

from tests.fakes import tiny_task

SEEN = []


def make(cache_dir, samples: int = 32):
    SEEN.append(cache_dir)
    assert isinstance(cache_dir, Path)
    return tiny_task(samples=samples)
'''


def test_a_plugin_beside_the_study_imports_and_gets_the_cache_dir(tmp_path, monkeypatch, capsys):
    """`[task] name = "mymod_beside:make"` with mymod_beside.py in the working directory,
    run without PYTHONPATH=.; the plugin declares cache_dir and receives [task] cache_dir."""
    (tmp_path / "mymod_beside.py").write_text(textwrap.dedent(PLUGIN))
    path = tiny_config(tmp_path, n_trials=2)
    path.write_text(path.read_text().replace("tests.fakes:tiny_task", "mymod_beside:make"))
    monkeypatch.chdir(tmp_path)
    # the interpreter's own working-directory entries would make the test pass without the fix
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "mymod_beside", raising=False)
    assert main(["describe", str(path)]) == 0
    assert "channel groups" in capsys.readouterr().out
    import mymod_beside

    assert mymod_beside.SEEN == [tmp_path / "cache"]
    assert sys.path[-1] == str(tmp_path)  # appended: it never shadows an installed module
    # an explicit [task.options] cache_dir (how older configs handed one over) wins
    load_task("mymod_beside:make", {"cache_dir": tmp_path / "own"}, cache_dir=tmp_path / "cache")
    assert mymod_beside.SEEN[-1] == tmp_path / "own"


def test_ray_token_notice_is_quieted_only_for_a_local_ray(monkeypatch):
    """Ray logs "Token authentication is enabled ..." for a new local cluster unless
    RAY_AUTH_MODE is set; setting it to Ray's own default (token) keeps auth on, silently."""
    for env in ("RAY_AUTH_MODE", "RAY_ADDRESS"):
        monkeypatch.delenv(env, raising=False)
    cli._quiet_ray_token_notice(argparse.Namespace(ray_address="head:6379"))
    assert "RAY_AUTH_MODE" not in os.environ  # joining a cluster: the cluster's own setting
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    cli._quiet_ray_token_notice(argparse.Namespace(ray_address=None))
    assert "RAY_AUTH_MODE" not in os.environ
    monkeypatch.delenv("RAY_ADDRESS")
    cli._quiet_ray_token_notice(argparse.Namespace(ray_address=None))
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's choice wins
    cli._quiet_ray_token_notice(argparse.Namespace(ray_address=None))
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
