"""The prunesearch command line: exit codes, one-line errors, storage left untouched."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

import search.runner
from search.cli import main
from search.config import load_config
from search.runner import run_study
from tests.fakes import FakePool, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("prunesearch: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """A study already in storage (fake pool), to resume or to clash with."""
    tmp = tmp_path_factory.mktemp("existing")
    path = tiny_config(tmp, n_trials=6)
    run_study(load_config(path), pool_factory=lambda p, a: FakePool(p.space), progress=False)
    return tmp, path


def variant(tmp: Path, name: str, text: str, old: str = "", new: str = "") -> Path:
    target = tmp / f"{name}.toml"
    target.write_text(text.replace(old, new) if old else text)
    return target


BAD = [
    # (case, old, new, extra argv)
    ("invalid-toml", "[study]", "[study", []),
    ("unknown-key", "seed = 0", "seed = 0\nsede = 1", []),
    ("unknown-section", "[export]", "[exports]", []),
    ("unknown-searcher", 'kind = "random"', 'kind = "annealing"', []),
    ("unknown-sampler", 'kind = "random"', 'kind = "cmaes"', []),
    ("unknown-searcher-option", 'kind = "random"', 'kind = "tpe"\n[searchers.options]\nstartup = 3', []),
    ("unknown-masking-start", 'kind = "random"', 'kind = "masking"\n[searchers.options]\nstarts = ["lamp"]', []),
    ("n-trials-zero", "n_trials = 6", "n_trials = 0", []),
    ("n-trials-negative-flag", "", "", ["--n-trials", "-2"]),
    ("unreachable-constraint", "max_flops_ratio = 0.7", "max_flops_ratio = 0.01", []),
    ("malformed-storage", 'storage = "sqlite:///', 'storage = "sqlite:/', []),
    ("malformed-storage-flag", "", "", ["--storage", "postgresql://u@h:port/db"]),
    ("different-space", "ratio_min = 0.2", "ratio_min = 0.3", []),
    ("different-objectives", "seed = 0", 'seed = 0\nobjectives = ["accuracy", "params"]', []),
    ("different-evaluation", "calibration_samples = 32", "calibration_samples = 16", []),
    ("different-seed-flag", "", "", ["--seed", "3"]),
    ("different-constraint", "max_flops_ratio = 0.7", "max_flops_ratio = 0.9", []),
    ("added-constraint", "max_flops_ratio = 0.7", "max_flops_ratio = 0.7\nmax_params_ratio = 0.9", []),
]


@pytest.mark.parametrize("case, old, new, argv", BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_2_with_one_line_and_leaves_storage_untouched(existing, case, old, new, argv, capsys):
    tmp, path = existing
    db = tmp / "tiny.db"
    before = digest(db)
    assert before is not None
    config = variant(tmp, case, path.read_text(), old, new)
    rc = main(["run", str(config), "--no-progress", *argv])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert digest(db) == before
    assert not (tmp / "tiny.db-wal").exists() or (tmp / "tiny.db-wal").stat().st_size == 0
    assert line.startswith(f"prunesearch: error: {config}: ")  # where


def test_bad_input_never_creates_storage(tmp_path, capsys):
    path = tiny_config(tmp_path, n_trials=4, constraints="max_flops_ratio = 0.01")
    assert main(["run", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "max_flops_ratio" in line and "ratio_min" in line  # what, and what to do
    assert not (tmp_path / "tiny.db").exists()
    assert main(["status", str(path)]) == 2
    assert "run `prunesearch run" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "tiny.db").exists()


def test_missing_config_and_bad_usage(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "not found" in one_error_line(capsys.readouterr().err)
    assert main(["frobnicate"]) == 2
    one_error_line(capsys.readouterr().err)
    assert main([]) == 2
    one_error_line(capsys.readouterr().err)
    assert main(["--help"]) == 0


def test_bad_input_through_a_subprocess(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[study]\nname = 'x'\nn_trials = 0\n[task]\nname = 'digits'\n[[searchers]]\nkind = 'tpe'\n")
    proc = subprocess.run([sys.executable, "-m", "search", "run", str(bad)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "n_trials must be > 0" in line and str(bad) in line
    assert proc.stdout == ""


def test_runtime_failure_exits_1_with_the_log_path(tmp_path, capsys):
    path = tiny_config(tmp_path, n_trials=4)
    path.write_text(path.read_text().replace("tests.fakes:tiny_task", "tests.fakes:broken_task"))
    assert main(["run", str(path)]) == 1
    line = one_error_line(capsys.readouterr().err)
    log = tmp_path / "tiny.log"
    assert "simulated failure while building the task" in line and str(log) in line
    assert "Traceback" in log.read_text()


def test_run_prints_the_pareto_table_and_status_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(search.runner, "default_pool", lambda prepared, address: FakePool(prepared.space))
    searchers = """
    [[searchers]]
    kind = "random"
    [[searchers]]
    kind = "genetic"
    [searchers.options]
    population = 4
    """
    path = tiny_config(tmp_path, n_trials=14, searchers=searchers)
    assert main(["run", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "14/14 trials finished" in out and "Pareto front (" in out and "flops_ratio" in out
    assert main(["run", str(path), "--no-progress", "--n-trials", "16"]) == 0
    assert "16/16 trials finished (2 new" in capsys.readouterr().out
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    # the budget the latest run was given, and the config's: not "16 finished of n_trials 14"
    assert "16 finished of n_trials 16 (the latest run's --n-trials; [study] n_trials is 14)" in out
    for name in ("random", "genetic", "COMPLETE", "fid:cheap", "fid:full", "Pareto front"):
        assert name in out
