"""The study's storage: URLs, opening (tuned SQLite, read-only inspection), the study's
identity checks, and the read-only API for a study's trials (``read_study``, ``load_records``).

Only the search layer touches storage. A storage is one of

* an SQLAlchemy URL Optuna's ``RDBStorage`` accepts (``sqlite:///studies/x.db``,
  ``postgresql://...``); SQLite files are opened in WAL mode with ``synchronous=NORMAL``
  (per-trial writes cost about half of the default rollback journal);
* a path ending in ``.journal``: Optuna's ``JournalStorage`` over a ``JournalFileBackend``.

Trials are written by ``search.recorder`` and read back as ``search.records.TrialRecord``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from search.config import ConfigError, StudyConfig
from search.records import TrialRecord, read_trials

log = logging.getLogger(__name__)

STUDY_ATTR_FINGERPRINT = "space_fingerprint"
STUDY_ATTR_OBJECTIVES = "objectives"
STUDY_ATTR_EVALUATION = "evaluation"
STUDY_ATTR_TASK = "task"
STUDY_ATTR_CONSTRAINTS = "constraint_bounds"  # name -> bound the trials were judged with (search.study_change)
STUDY_ATTR_BASE = "base"                # the unpruned model's metrics (search.baseline)
STUDY_ATTR_N_TRIALS = "n_trials"        # the trial budget the latest run was given
# Evaluation settings that may change between runs of one study (they do not change results).
_VOLATILE_SETTINGS = ("threads",)


# -- URLs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class StorageSpec:
    """A parsed storage location. ``path`` is the file for SQLite and journal storages."""

    url: str
    kind: str  # "sqlite" | "rdb" | "journal"
    path: Path | None = None

    def exists(self) -> bool:
        """Whether a storage is already there (always assumed for server databases)."""
        return self.path.exists() if self.path is not None else True


def parse_storage(url: str) -> StorageSpec:
    """Validate a storage URL without touching it; ``ConfigError`` says what is wrong."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("storage is empty: give an SQLAlchemy URL (sqlite:///studies/x.db) or a .journal path")
    if "://" not in url:
        if url.endswith(".journal"):
            return StorageSpec(url=url, kind="journal", path=Path(url))
        raise ConfigError(
            f"storage {url!r} is neither a database URL (e.g. sqlite:///studies/x.db) nor a path ending "
            "in .journal: fix [study] storage or --storage"
        )
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError(
            f"storage URL {url!r} is malformed: write dialect://user@host/db or sqlite:///path/to/file.db"
        ) from None
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(f"storage URL {url!r}: unknown database dialect {parsed.drivername!r}") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise ConfigError(
            f"storage URL {url!r} needs the database driver {getattr(exc, 'name', None) or exc}: install it or use sqlite"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if parsed.host:
            raise ConfigError(
                f"storage URL {url!r} is malformed: SQLite URLs have no host; write "
                "sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        if database in ("", ":memory:") or database.startswith("file:"):
            raise ConfigError(
                f"storage URL {url!r} is not an SQLite file (in-memory and URI forms keep nothing): "
                "use sqlite:///path/to/file.db"
            )
        return StorageSpec(url=url, kind="sqlite", path=Path(database))
    return StorageSpec(url=url, kind="rdb")


# -- opening -----------------------------------------------------------------------------
def _sqlite_connector(path: Path, read_only: bool):
    def connect() -> sqlite3.Connection:
        if read_only:
            conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, check_same_thread=False)
        else:
            conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30.0)
            # WAL: readers (optuna-dashboard) never block the driver; NORMAL: no fsync per commit.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return connect


@contextlib.contextmanager
def _file_lock(path: Path, enabled: bool = True):
    """Exclusive advisory lock on ``path`` (POSIX flock) for the duration of the block."""
    if not enabled:
        yield
        return
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_storage(spec: StorageSpec, *, read_only: bool = False) -> optuna.storages.BaseStorage:
    """Open ``spec`` (creating an SQLite file and its directory unless ``read_only``).

    Read-only opening of a missing file storage raises ``ConfigError``.
    """
    if read_only and not spec.exists():
        raise ConfigError(f"no study storage at {str(spec.path)!r}: run `prunesearch run CONFIG` first")
    if spec.kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        if not read_only:
            spec.path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(spec.path)))
    if spec.kind == "sqlite":
        if not read_only:
            spec.path.parent.mkdir(parents=True, exist_ok=True)
        # Launchers started together on a new file race to create Optuna's tables ("table
        # trial_params already exists"): an exclusive lock beside the file serialises it.
        with _file_lock(spec.path.with_name(spec.path.name + ".lock"), enabled=not read_only):
            rdb = optuna.storages.RDBStorage(
                spec.url,
                engine_kwargs={"creator": _sqlite_connector(spec.path, read_only)},
                skip_table_creation=read_only,
            )
    else:
        rdb = _open_rdb(spec.url, read_only)
    # The same cached wrapper Optuna would build; shared by every study handle of the run.
    return optuna.storages.get_storage(rdb)


def _open_rdb(url: str, read_only: bool, patience_s: float = 20.0) -> optuna.storages.RDBStorage:
    """``RDBStorage(url)``, retried while another launcher creates the schema.

    Launchers started together on a fresh server database race to create Optuna's schema
    (PostgreSQL: "duplicate key value violates unique constraint pg_type_typname_nsp_index"
    on ``CREATE TABLE``); the loser's retry finds the schema there. Read-only openers retry
    too: Optuna stamps the schema version (``alembic_version``) even when it skips creating
    tables, so an inspector that arrives between another launcher's tables and its stamp
    races it the same way.
    """
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    deadline = time.monotonic() + patience_s
    attempt = 0
    while True:
        try:
            return optuna.storages.RDBStorage(url, skip_table_creation=read_only)
        except (IntegrityError, ProgrammingError, optuna.exceptions.StorageInternalError) as exc:
            attempt += 1
            if time.monotonic() >= deadline:
                raise
            log.info("storage schema being created by another launcher (%s); retrying", type(exc).__name__)
            time.sleep(min(0.1 * attempt, 1.0))


def close_storage(storage: optuna.storages.BaseStorage) -> None:
    """Close an RDB storage's connections (SQLite then folds its WAL back into the file)."""
    backend = getattr(storage, "_backend", storage)
    session = getattr(backend, "scoped_session", None)
    if session is not None:
        session.remove()
    engine = getattr(backend, "engine", None)
    if engine is not None:
        engine.dispose()


@contextlib.contextmanager
def inspect_storage(spec: StorageSpec) -> Iterator[optuna.storages.BaseStorage | None]:
    """A read-only view of an existing storage (``None`` when there is none yet).

    Nothing is written: SQLite is opened with ``mode=ro`` and the -wal/-shm side files a
    reader creates are removed again when they were not there before.
    """
    if not spec.exists():
        yield None
        return
    if spec.kind == "rdb" and not _rdb_has_optuna_tables(spec.url):
        # A fresh server database (no complete Optuna schema yet) holds no study; Optuna
        # cannot open it read-only ("relation version_info does not exist").
        yield None
        return
    sidecars = [Path(f"{spec.path}{s}") for s in ("-wal", "-shm")] if spec.kind == "sqlite" else []
    # Noted before the format probe below: reading a WAL-mode file read-only creates
    # -wal/-shm that the reader cannot remove, so `status` / `export` / bad-input runs would
    # leave them behind.
    before = {p: p.exists() for p in sidecars}
    try:
        schema = _sqlite_schema(spec.path) if spec.kind == "sqlite" else "optuna"
        if schema == "foreign":
            raise ConfigError(f"{str(spec.path)!r} exists but is not an Optuna study storage: choose another storage path")
        if schema == "incomplete":
            # Another launcher is creating Optuna's tables in this file (or it is an empty
            # database): it holds no study yet.
            yield None
            return
        storage = open_storage(spec, read_only=True)
        try:
            yield storage
        finally:
            close_storage(storage)
    finally:
        for p, existed in before.items():
            if not existed and p.exists() and (p.name.endswith("-shm") or p.stat().st_size == 0):
                with contextlib.suppress(OSError):
                    p.unlink()


# Optuna's last step in a new database is stamping ``alembic_version`` (table and row in
# one transaction): until it is there another launcher is still creating the schema.
_COMPLETE_RDB_SCHEMA = frozenset({"studies", "trials", "version_info", "alembic_version"})


def _rdb_has_optuna_tables(url: str) -> bool:
    """Whether a server database holds Optuna's complete schema (not one being created)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        return _COMPLETE_RDB_SCHEMA <= set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _sqlite_schema(path: Path) -> str:
    """``"optuna"`` (a complete Optuna schema), ``"incomplete"`` (only Optuna tables, some
    missing: empty, or being created by another launcher) or ``"foreign"`` (not SQLite, or
    tables of something else)."""
    try:
        conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    except sqlite3.Error:
        return "foreign"
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError:
        return "foreign"
    finally:
        conn.close()
    from optuna.storages._rdb.models import BaseModel

    optuna_tables = set(BaseModel.metadata.tables) | {"alembic_version", "sqlite_sequence"}
    if not tables <= optuna_tables:
        return "foreign"
    return "optuna" if {"studies", "trials", "version_info"} <= tables else "incomplete"


def find_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.study.StudySummary | None:
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if summary.study_name == name:
            return summary
    return None


def _comparable_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in _VOLATILE_SETTINGS}


def check_compatible(summary: optuna.study.StudySummary, *, fingerprint: Mapping[str, Any],
                     objectives: Sequence[str], evaluation: Mapping[str, Any], where: str) -> None:
    """``ConfigError`` when an existing study was made with another space/objectives/evaluation."""
    attrs = summary.user_attrs
    stored = attrs.get(STUDY_ATTR_FINGERPRINT)
    if stored is None and summary.n_trials == 0:
        return  # created by a launcher that stopped before writing its attrs: nothing to clash with
    if stored is None:
        raise ConfigError(
            f"study {summary.study_name!r} in {where} was not created by prunesearch: choose another [study] name"
        )
    if json.loads(json.dumps(fingerprint)) != stored:
        diff = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != json.loads(json.dumps(fingerprint)).get(k))
        raise ConfigError(
            f"study {summary.study_name!r} in {where} was made with a different search space ({', '.join(diff)} differ): "
            "restore the original [space]/[task] or choose a new [study] name"
        )
    if list(attrs.get(STUDY_ATTR_OBJECTIVES, [])) != list(objectives):
        raise ConfigError(
            f"study {summary.study_name!r} in {where} optimises {attrs.get(STUDY_ATTR_OBJECTIVES)} not {list(objectives)}: "
            "restore [study] objectives or choose a new [study] name"
        )
    stored_eval = attrs.get(STUDY_ATTR_EVALUATION)
    current = _comparable_settings(json.loads(json.dumps(evaluation)))
    # only settings both know: a field added to EvalSettings later must not block a resume
    diff = sorted(k for k, v in _comparable_settings(stored_eval or {}).items() if k in current and current[k] != v)
    if diff:
        raise ConfigError(
            f"study {summary.study_name!r} in {where} was evaluated with other [evaluation] settings "
            f"({', '.join(diff)} differ): restore them or choose a new [study] name"
        )


# -- reading a study ---------------------------------------------------------------------
def read_study(config: StudyConfig, *, source: str | None = None
               ) -> tuple[optuna.study.StudySummary, list[TrialRecord]]:
    """The summary and every trial of ``config``'s study, read without writing anything.

    ``ConfigError`` when the storage holds no such study; ``source`` (the config's path)
    completes the hint of what to run first.
    """
    spec = parse_storage(config.study.storage_url)
    with inspect_storage(spec) as storage:
        summary = find_study(storage, config.name) if storage is not None else None
        if summary is None:
            command = f"prunesearch run {source}" if source else "prunesearch run"
            raise ConfigError(f"no study {config.name!r} in {config.study.storage_url}: run `{command}` first")
        study = optuna.load_study(study_name=config.name, storage=storage)
        return summary, read_trials(study)


def load_records(config: StudyConfig) -> list[TrialRecord]:
    """Every trial of ``config``'s study (read-only; for reports and benchmarks)."""
    return read_study(config)[1]
