"""Storage inspection: an SQLite file is a study storage, one being created, or something else."""

from __future__ import annotations

import sqlite3

import pytest

from search.config import ConfigError
from search.storage import inspect_storage, open_storage, parse_storage


def _spec(path):
    return parse_storage(f"sqlite:///{path}")


def test_an_empty_sqlite_file_holds_no_study_yet(tmp_path):
    """What a second launcher sees while the first creates Optuna's tables in a new file."""
    path = tmp_path / "new.db"
    sqlite3.connect(path).close()
    path.touch()
    with inspect_storage(_spec(path)) as storage:
        assert storage is None


def test_a_complete_optuna_file_opens_read_only(tmp_path):
    path = tmp_path / "study.db"
    open_storage(_spec(path))
    with inspect_storage(_spec(path)) as storage:
        assert storage is not None


@pytest.mark.parametrize("make", [
    lambda p: p.write_text("not a database\n"),
    lambda p: sqlite3.connect(p).execute("CREATE TABLE notes (x)").connection.commit(),
])
def test_anything_else_is_refused(tmp_path, make):
    path = tmp_path / "other.db"
    make(path)
    with pytest.raises(ConfigError, match="is not an Optuna study storage"):
        with inspect_storage(_spec(path)):
            pass
