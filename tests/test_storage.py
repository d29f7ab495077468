"""Storage inspection: an SQLite file is a study storage, one being created, or something else."""

from __future__ import annotations

import sqlite3

import optuna
import pytest

import search.storage
from search.config import ConfigError
from search.storage import close_storage, inspect_storage, open_storage, parse_storage


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


@pytest.mark.slow
def test_a_server_database_being_created_holds_no_study_yet():
    """What a second launcher sees on PostgreSQL between the first one's tables and its
    schema stamp: no study, and it does not race the first to stamp (a duplicate-key error)."""
    import sqlalchemy
    from optuna.storages._rdb import models

    from tests.postgres import postgres_url_or_skip

    with postgres_url_or_skip() as url:
        engine = sqlalchemy.create_engine(url)
        models.BaseModel.metadata.create_all(engine)  # Optuna's first step, before the stamp
        spec = parse_storage(url)
        with inspect_storage(spec) as storage:
            assert storage is None
        assert "alembic_version" not in sqlalchemy.inspect(engine).get_table_names()
        engine.dispose()
        close_storage(open_storage(spec))  # the launcher's own opening completes the schema
        with inspect_storage(spec) as storage:
            assert storage is not None


def test_a_read_only_opener_retries_while_the_schema_is_stamped(monkeypatch):
    from sqlalchemy.exc import IntegrityError

    calls = []

    class Racing:
        def __init__(self, url, skip_table_creation):
            calls.append(skip_table_creation)
            if len(calls) < 3:
                raise IntegrityError("CREATE TABLE alembic_version", {}, Exception("duplicate key"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", Racing)
    monkeypatch.setattr(search.storage.time, "sleep", lambda s: None)
    assert isinstance(search.storage._open_rdb("postgresql://h/db", read_only=True), Racing)
    assert calls == [True, True, True]


def test_an_opener_gives_up_once_its_patience_is_spent(monkeypatch):
    from sqlalchemy.exc import ProgrammingError

    def broken(url, skip_table_creation):
        raise ProgrammingError("CREATE TYPE", {}, Exception("permission denied"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    monkeypatch.setattr(search.storage.time, "sleep", lambda s: None)
    with pytest.raises(ProgrammingError):
        search.storage._open_rdb("postgresql://h/db", read_only=False, patience_s=0.0)
