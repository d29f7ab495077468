"""Resuming with other [constraints]: refused (exit 2, storage byte-identical), or with
--allow-changed-constraints every trial re-judged from its stored metrics, so the front
never holds a trial another feasible trial dominates."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import search.runner
from search.base import FULL
from search.cli import main
from search.config import load_config
from search.launchers import Launcher, write_heartbeat
from search.records import dominates, pareto_front
from search.runner import run_study
from search.storage import STUDY_ATTR_CONSTRAINTS, close_storage, load_records, open_storage, parse_storage
from search.study_change import check_constraints
from tests.fakes import FakePool, tiny_config


def _fake(prepared, address=None):
    return FakePool(prepared.space)


def _digests(tmp: Path) -> dict[str, str | None]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp.iterdir())
            if p.name.startswith("tiny.") and p.suffix in (".db", ".journal", ".db-wal", ".db-shm", ".lock")}


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunesearch: error: "), err
    return lines[0]


def _study(tmp: Path, journal: bool, n_trials: int = 16, bound: str = "0.5") -> Path:
    path = tiny_config(tmp, n_trials=n_trials, constraints=f"max_flops_ratio = {bound}", journal=journal)
    run_study(load_config(path), pool_factory=_fake, progress=False)
    return path


def _open(url: str):
    return open_storage(parse_storage(url), read_only=True)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize("journal", [False, True], ids=["sqlite", "journal"])
def test_a_changed_constraint_is_refused_and_storage_is_byte_identical(tmp_path, capsys, journal):
    path = _study(tmp_path, journal)
    before = _digests(tmp_path)
    _edit(path, "max_flops_ratio = 0.5", "max_flops_ratio = 0.8")
    for argv in (["run", str(path), "--no-progress"], ["export", str(path)]):
        assert main(argv) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "max_flops_ratio 0.5 -> 0.8" in line and "--allow-changed-constraints" in line  # what, how
        assert "new [study] name" in line
        assert _digests(tmp_path) == before
    assert not (tmp_path / "exports").exists()
    # status still reads the study, and says the config no longer matches its trials
    assert main(["status", str(path)]) == 0
    assert "judged with other [constraints]" in capsys.readouterr().out
    assert _digests(tmp_path) == before


def _check_front(records, config) -> None:
    """Every COMPLETE trial judged by today's bounds; no front trial dominated by a feasible one."""
    bound = config.constraints.max_flops_ratio
    for r in records:
        if r.state == TrialState.COMPLETE:
            assert r.constraints == pytest.approx(dict(zip(config.constraints.names,
                                                           config.constraints.values(r.metrics))))
            assert r.feasible == (r.metrics.flops_ratio <= bound)
    feasible = [r for r in records if r.state == TrialState.COMPLETE and r.fidelity == FULL
                and r.metrics.flops_ratio <= bound]
    front = pareto_front(records, config.study.directions)
    assert front
    for f in front:
        assert f.metrics.flops_ratio <= bound
        assert not any(dominates(o.values, f.values, config.study.directions) for o in feasible)


@pytest.mark.parametrize("journal", [False, True], ids=["sqlite", "journal"])
def test_allow_changed_constraints_rejudges_every_trial(tmp_path, capsys, monkeypatch, journal):
    monkeypatch.setattr(search.runner, "default_pool", _fake)
    path = _study(tmp_path, journal)
    old = load_records(load_config(path))
    storage_url = load_config(path).study.storage_url
    attrs_before = optuna.load_study(study_name="tiny", storage=_open(storage_url)).user_attrs
    _edit(path, "max_flops_ratio = 0.5", "max_flops_ratio = 0.8")
    config = load_config(path)
    # trials between the old and the new bound were infeasible and now are not: what goes wrong unjudged
    between = [r.number for r in old if r.state == TrialState.COMPLETE and 0.5 < r.metrics.flops_ratio <= 0.8]
    assert between and not any(r.feasible for r in old if r.number in between)

    assert main(["run", str(path), "--no-progress", "--allow-changed-constraints"]) == 0
    out = capsys.readouterr().out
    assert f"every trial re-judged under the new [constraints]; {len(between)} changed feasibility" in out
    records = load_records(config)
    assert [(r.number, r.params, r.values, r.policy, r.searcher) for r in records] == \
        [(r.number, r.params, r.values, r.policy, r.searcher) for r in old]  # only the judgement changed
    assert all(r.feasible for r in records if r.number in between)
    _check_front(records, config)
    study = optuna.load_study(study_name="tiny", storage=_open(storage_url))
    assert study.user_attrs[STUDY_ATTR_CONSTRAINTS] == {"max_flops_ratio": 0.8}
    assert {k: v for k, v in study.user_attrs.items() if k != STUDY_ATTR_CONSTRAINTS} == \
        {k: v for k, v in attrs_before.items() if k != STUDY_ATTR_CONSTRAINTS}
    assert [s.study_name for s in optuna.get_all_study_summaries(_open(storage_url))] == ["tiny"]  # no backup left

    # the study resumes under the new bound: more trials, and the front is still sound
    assert main(["run", str(path), "--no-progress", "--n-trials", "24"]) == 0
    capsys.readouterr()
    _check_front(load_records(config), config)
    assert main(["status", str(path)]) == 0
    assert "judged with other" not in capsys.readouterr().out


def test_a_study_without_stored_bounds_has_them_inferred_from_its_trials(tmp_path, capsys):
    """Studies made before the bounds were stored: the recorded constraint values tell."""
    path = _study(tmp_path, journal=True)
    url = load_config(path).study.storage_url
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    study_id = storage.get_study_id_from_name("tiny")
    # a journal replays the latest value of a key: an empty table of bounds is what an old
    # study reads as (``constraint_changes`` falls back to the trials for anything not a table)
    storage.set_study_user_attr(study_id, STUDY_ATTR_CONSTRAINTS, None)
    config = load_config(path)
    assert check_constraints(config) is False  # the same bounds: nothing to re-judge
    _edit(path, "max_flops_ratio = 0.5", "max_flops_ratio = 0.6")
    assert main(["run", str(path), "--no-progress"]) == 2
    assert "max_flops_ratio 0.5 -> 0.6" in _one_error_line(capsys.readouterr().err)


def test_rejudging_is_refused_while_another_launcher_runs_the_study(tmp_path, capsys):
    """Re-judging rewrites the study; under a live launcher it would pull trials from under it."""
    path = _study(tmp_path, journal=False)
    config = load_config(path)
    storage = open_storage(parse_storage(config.study.storage_url))
    alive = Launcher(run_id="other", host=socket.gethostname(), pid=os.getppid(), heartbeat=time.time())
    write_heartbeat(storage, storage.get_study_id_from_name("tiny"), alive)
    close_storage(storage)
    before = _digests(tmp_path)
    _edit(path, "max_flops_ratio = 0.5", "max_flops_ratio = 0.8")
    assert main(["run", str(path), "--no-progress", "--allow-changed-constraints"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "another launcher is running it" in line and "stop that launcher first" in line
    assert _digests(tmp_path) == before


CHANGES = [
    # (what changed, config edit old -> new, extra argv, what the one line must name)
    ("space", "ratio_min = 0.2", "ratio_min = 0.3", [], "different search space (ratio differ)"),
    ("objectives", "seed = 0", 'seed = 0\nobjectives = ["accuracy", "params"]', [],
     "optimises ['accuracy', 'flops'] not ['accuracy', 'params']"),
    ("evaluation", "calibration_samples = 32", "calibration_samples = 16", [],
     "other [evaluation] settings (calibration_samples differ)"),
    ("seed", "", "", ["--seed", "3"], "other [evaluation] settings (seed differ)"),
]


@pytest.mark.parametrize("what, old, new, argv, fragment", CHANGES, ids=[c[0] for c in CHANGES])
def test_every_other_change_is_refused_naming_it_and_how_to_go_on(tmp_path, capsys, what, old, new, argv, fragment):
    path = _study(tmp_path, journal=True, n_trials=4)
    before = _digests(tmp_path)
    if old:
        _edit(path, old, new)
    assert main(["run", str(path), "--no-progress", *argv]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert fragment in line and "choose a new [study] name" in line
    assert _digests(tmp_path) == before


@pytest.mark.slow
def test_rejudging_on_postgresql(tmp_path, capsys, monkeypatch):
    """The rewrite uses only Optuna's storage API: a server database re-judges the same way."""
    from tests.postgres import postgres_url_or_skip

    with postgres_url_or_skip() as url:
        monkeypatch.setattr(search.runner, "default_pool", _fake)
        path = tiny_config(tmp_path, n_trials=12, constraints="max_flops_ratio = 0.5")
        path.write_text(path.read_text().replace(f'storage = "sqlite:///{tmp_path}/tiny.db"', f'storage = "{url}"'))
        run_study(load_config(path), pool_factory=_fake, progress=False)
        _edit(path, "max_flops_ratio = 0.5", "max_flops_ratio = 0.8")
        assert main(["run", str(path), "--no-progress"]) == 2
        capsys.readouterr()
        assert main(["run", str(path), "--no-progress", "--allow-changed-constraints"]) == 0
        assert "every trial re-judged" in capsys.readouterr().out
        config = load_config(path)
        records = load_records(config)
        assert len(records) == 12
        _check_front(records, config)
