"""The study's storage: URLs, opening (tuned SQLite, read-only inspection), recording trials,
reading them back, launcher liveness and the Pareto front.

Only the driver touches storage. A storage is one of

* an SQLAlchemy URL Optuna's ``RDBStorage`` accepts (``sqlite:///studies/x.db``,
  ``postgresql://...``); SQLite files are opened in WAL mode with ``synchronous=NORMAL``
  (per-trial writes cost about half of the default rollback journal);
* a path ending in ``.journal``: Optuna's ``JournalStorage`` over a ``JournalFileBackend``.

Trial layout (what optuna-dashboard shows): params = group names (+ ``method`` ...);
user attrs ``searcher``, ``generation``, ``fidelity``, ``policy`` (JSON), ``run`` (the
launcher's run id), ``settings`` (evaluation-setting overrides, only when the proposal has
them), ``meta`` (only when non-empty) at creation, and ``metrics`` (every Metrics field plus
``constraints``: name -> value) at the end, one write; constraint values also go through
``trial.set_constraint`` so Optuna's samplers and ``best_trials`` see them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evaluators.metrics import Metrics
from search.base import FULL, MAXIMIZE, Outcome, Proposal
from search.config import ConfigError
from search.params import distributions
from spaces.policy import Policy

log = logging.getLogger(__name__)

STUDY_ATTR_FINGERPRINT = "space_fingerprint"
STUDY_ATTR_OBJECTIVES = "objectives"
STUDY_ATTR_EVALUATION = "evaluation"
STUDY_ATTR_TASK = "task"
LAUNCHER_PREFIX = "prunesearch:launcher:"
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


def _open_rdb(url: str, read_only: bool, attempts: int = 5) -> optuna.storages.RDBStorage:
    """[reliability fix] ``RDBStorage(url)``, retried while another launcher creates the tables.

    Launchers started together on a fresh server database race to create Optuna's schema
    (PostgreSQL: "duplicate key value violates unique constraint pg_type_typname_nsp_index"
    on ``CREATE TYPE``); the loser used to exit 1. A retry finds the schema there.
    """
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, skip_table_creation=read_only)
        except (IntegrityError, ProgrammingError, optuna.exceptions.StorageInternalError) as exc:
            if read_only or attempt == attempts - 1:
                raise
            log.info("storage schema being created by another launcher (%s); retrying", type(exc).__name__)
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


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
        # [reliability fix] a fresh server database (no Optuna tables yet) holds no study;
        # opening it read-only used to fail ("relation version_info does not exist", exit 1).
        yield None
        return
    sidecars = [Path(f"{spec.path}{s}") for s in ("-wal", "-shm")] if spec.kind == "sqlite" else []
    # [reliability fix] noted before the format probe below: reading a WAL-mode file
    # read-only creates -wal/-shm that the reader cannot remove, and the probe used to run
    # first, so every `status` / `export` / bad-input run left them behind.
    before = {p: p.exists() for p in sidecars}
    try:
        if spec.kind == "sqlite" and not _is_optuna_sqlite(spec.path):
            raise ConfigError(f"{str(spec.path)!r} exists but is not an Optuna study storage: choose another storage path")
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


def _rdb_has_optuna_tables(url: str) -> bool:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        return "version_info" in sqlalchemy.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def _is_optuna_sqlite(path: Path) -> bool:
    try:
        conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    except sqlite3.Error:
        return False
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError:
        return False
    finally:
        conn.close()
    return {"studies", "trials", "version_info"} <= tables


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


# -- launchers ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Launcher:
    """One ``prunesearch run`` process; its heartbeat tells whether its RUNNING trials live."""

    run_id: str
    host: str
    pid: int
    heartbeat: float

    @classmethod
    def current(cls) -> "Launcher":
        return cls(run_id=uuid.uuid4().hex[:12], host=socket.gethostname(), pid=os.getpid(), heartbeat=time.time())

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "heartbeat": self.heartbeat}

    def alive(self, me: "Launcher", grace_s: float) -> bool:
        """Whether this launcher may still be running (seen from launcher ``me``)."""
        if self.run_id == me.run_id:
            return True
        fresh = (me.heartbeat if me.heartbeat > time.time() else time.time()) - self.heartbeat <= grace_s
        if self.host != me.host:
            return fresh
        if self.pid == me.pid:  # an earlier run inside this very process is over
            return False
        return fresh and _pid_alive(self.pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_launchers(storage: optuna.storages.BaseStorage, study_id: int) -> dict[str, Launcher]:
    out = {}
    for key, value in storage.get_study_system_attrs(study_id).items():
        if key.startswith(LAUNCHER_PREFIX) and isinstance(value, dict):
            run_id = key[len(LAUNCHER_PREFIX):]
            out[run_id] = Launcher(run_id, str(value.get("host")), int(value.get("pid", -1)),
                                   float(value.get("heartbeat", 0.0)))
    return out


def write_heartbeat(storage: optuna.storages.BaseStorage, study_id: int, me: Launcher) -> Launcher:
    me = Launcher(me.run_id, me.host, me.pid, time.time())
    storage.set_study_system_attr(study_id, LAUNCHER_PREFIX + me.run_id, me.to_dict())
    return me


# [reliability fix] Several launchers on one study share one budget. Each launcher used to
# count only its own trials (two launchers with n_trials = 8 ended with 16 COMPLETE); the
# runner now asks the storage how many trials hold a place in the budget (below).
def other_live_launchers(launchers: Mapping[str, Launcher], me: Launcher, grace_s: float) -> list[Launcher]:
    """Launchers other than ``me`` that may still be running."""
    return [l for run_id, l in launchers.items() if run_id != me.run_id and l.alive(me, grace_s)]


def claimed_trials(trials: Sequence[FrozenTrial], launchers: Mapping[str, Launcher], me: Launcher,
                   grace_s: float, *, below: int | None = None) -> int:
    """How many trials (numbered below ``below``, if given) hold a place in the budget.

    Finished by an evaluation (COMPLETE, or FAIL with the evaluation's error) or RUNNING for
    a launcher that may still be alive. Trials failed as stale or over budget, and RUNNING
    trials of dead launchers (they will be failed as stale), hold none. A RUNNING trial
    without a launcher id holds a place only while it is young and another launcher is
    alive: an Optuna searcher's ``study.ask`` creates the trial a moment before the runner
    writes its ``run`` attr; with no other launcher alive it is a dead launcher's leftover.
    """
    now = time.time()
    others = bool(other_live_launchers(launchers, me, grace_s))
    count = 0
    for t in trials:
        if below is not None and t.number >= below:
            continue
        if t.state == TrialState.COMPLETE:
            count += 1
        elif t.state == TrialState.FAIL:
            metrics = t.user_attrs.get("metrics")
            count += isinstance(metrics, dict) and metrics.get("error") is not None
        elif t.state == TrialState.RUNNING:
            owner = launchers.get(t.user_attrs.get("run"))
            if owner is not None:
                count += owner.alive(me, grace_s)
            elif others:
                start = t.datetime_start.timestamp() if t.datetime_start is not None else 0.0
                count += now - start <= grace_s
    return count


# -- reading trials back -----------------------------------------------------------------
@dataclass(frozen=True)
class TrialRecord:
    """A trial as prunesearch reads it back: proposal, metrics, values, constraints."""

    number: int
    trial_id: int
    state: TrialState
    searcher: str
    generation: int
    fidelity: str
    policy: Policy | None
    metrics: Metrics | None
    values: tuple[float, ...] | None
    constraints: dict[str, float]
    run: str | None
    stale: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    cached_from: int | None = None

    @classmethod
    def from_frozen(cls, t: FrozenTrial) -> "TrialRecord":
        ua = t.user_attrs
        policy = None
        if isinstance(ua.get("policy"), str):
            try:
                policy = Policy.from_json(ua["policy"])
            except ValueError:
                policy = None
        raw = ua.get("metrics")
        metrics = Metrics.from_dict(raw) if isinstance(raw, dict) else None
        return cls(
            number=t.number,
            trial_id=t._trial_id,
            state=t.state,
            searcher=str(ua.get("searcher", "?")),
            generation=int(ua.get("generation", 0)),
            fidelity=str(ua.get("fidelity", FULL)),
            policy=policy,
            metrics=metrics,
            values=tuple(t.values) if t.values is not None else None,
            constraints=dict(t.constraints),
            run=ua.get("run"),
            stale=bool(ua.get("stale", False)),
            settings=dict(ua.get("settings") or {}),
            meta=dict(ua.get("meta") or {}),
            cached_from=raw.get("cached_from") if isinstance(raw, dict) else None,
        )

    @property
    def evaluated(self) -> bool:
        """Finished by an evaluation (COMPLETE, or FAIL with the evaluation's error)."""
        if self.state == TrialState.COMPLETE:
            return True
        return self.state == TrialState.FAIL and self.metrics is not None and self.metrics.error is not None

    @property
    def feasible(self) -> bool:
        return self.state == TrialState.COMPLETE and all(v <= 0 for v in self.constraints.values())

    def proposal(self, base_settings: Any) -> Proposal:
        """The searcher's proposal; under a watermark ``policy`` is its projection and the
        searcher's own policy is in ``meta["proposal"]``."""
        settings = base_settings.replace(**self.settings) if self.settings else None
        meta = dict(self.meta)
        own = meta.pop("proposal", None)
        policy = Policy.from_json(own) if isinstance(own, str) else self.policy
        return Proposal(policy, generation=self.generation, settings=settings, meta=meta)

    def outcome(self, base_settings: Any, constraint_names: Sequence[str]) -> Outcome:
        metrics = self.metrics or Metrics.failure("no metrics recorded", fidelity=self.fidelity)
        values = self.values if self.state == TrialState.COMPLETE else None
        constraints = tuple(float(self.constraints.get(n, math.inf)) for n in constraint_names)
        return Outcome(self.proposal(base_settings), metrics, values, constraints, number=self.number)


def read_trials(study: optuna.Study) -> list[TrialRecord]:
    return [TrialRecord.from_frozen(t) for t in study.get_trials(deepcopy=False)]


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    better = False
    for x, y, d in zip(a, b, directions):
        if d != MAXIMIZE:
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def pareto_front(records: Sequence[TrialRecord], directions: Sequence[str]) -> list[TrialRecord]:
    """Feasible COMPLETE full-fidelity trials no other such trial dominates, one per policy.

    Sorted by the second objective (e.g. FLOPs) ascending, then the first descending.
    """
    pool: dict[str, TrialRecord] = {}
    for r in records:
        if r.feasible and r.fidelity == FULL and r.values is not None and r.policy is not None:
            pool.setdefault(r.policy.key(), r)  # duplicates of a policy: keep the first trial
    cands = list(pool.values())
    front = [r for r in cands if not any(dominates(o.values, r.values, directions) for o in cands if o is not r)]
    # equal values of different policies are all kept (neither dominates)
    def order(r: TrialRecord) -> tuple:
        signed = tuple(v if d != MAXIMIZE else -v for v, d in zip(r.values, directions))
        return signed[1:] + signed[:1] + (r.number,)

    return sorted(front, key=order)


# -- recording trials --------------------------------------------------------------------
class TrialRecorder:
    """Creates and finishes the trials of proposals; the only writer of trial data."""

    def __init__(self, storage: optuna.storages.BaseStorage, study_name: str, *, space: Any,
                 settings: Any, objectives: Sequence[str], constraints: Any, run_id: str = "") -> None:
        from search.config import OBJECTIVES

        self.storage = storage
        self.study_name = study_name
        self.study_id = storage.get_study_id_from_name(study_name)
        self.space = space
        self.settings = settings
        self.objectives = tuple(objectives)
        self._fields = tuple(OBJECTIVES[o][0] for o in self.objectives)
        self.constraints = constraints
        self.run_id = run_id
        self._distributions = distributions(space)
        # Handle for trials whose params the driver fixes; its sampler never samples.
        self.fixed_study = optuna.load_study(study_name=study_name, storage=storage,
                                             sampler=optuna.samplers.RandomSampler(seed=0))

    def _attrs(self, label: str, proposal: Proposal) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "searcher": label,
            "generation": proposal.generation,
            "fidelity": proposal.fidelity,
            "policy": proposal.policy.to_json(),
        }
        if self.run_id:
            attrs["run"] = self.run_id
        if proposal.settings is not None:
            attrs["settings"] = self.settings_overrides(proposal)
        if proposal.meta:
            attrs["meta"] = dict(proposal.meta)
        return attrs

    def settings_overrides(self, proposal: Proposal) -> dict[str, Any]:
        """The evaluation settings in which ``proposal`` differs from the study's."""
        if proposal.settings is None:
            return {}
        base, own = self.settings.to_dict(), proposal.settings.to_dict()
        return {k: v for k, v in own.items() if base.get(k) != v}

    def open(self, label: str, proposal: Proposal) -> optuna.trial.Trial:
        """The RUNNING trial of ``proposal`` (created here unless the searcher made it)."""
        attrs = self._attrs(label, proposal)
        if proposal.trial is not None:
            for key, value in attrs.items():
                proposal.trial.set_user_attr(key, value)
            return proposal.trial
        # One transaction with every param and attr; the trial is RUNNING from birth, so
        # no other asker can pick it up (unlike enqueue_trial's WAITING trials).
        template = optuna.trial.create_trial(
            state=TrialState.RUNNING,
            params=self.space.to_params(proposal.policy),
            distributions=self._distributions,
            user_attrs=attrs,
        )
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=template)
        return optuna.trial.Trial(self.fixed_study, trial_id)

    def values_of(self, metrics: Metrics) -> tuple[float, ...] | None:
        if not metrics.ok:
            return None
        values = tuple(getattr(metrics, f) for f in self._fields)
        if any(v is None or not math.isfinite(v) for v in values):
            return None
        return tuple(float(v) for v in values)

    def finish(self, trial: optuna.trial.Trial, proposal: Proposal, metrics: Metrics,
               cached_from: int | None = None) -> Outcome:
        """Record ``metrics`` and tell the study; returns the searcher's :class:`Outcome`."""
        values = self.values_of(metrics)
        if values is None and metrics.error is None:
            missing = [o for o, f in zip(self.objectives, self._fields) if getattr(metrics, f) is None]
            metrics = Metrics.failure(f"objective(s) {', '.join(missing) or 'values'} not measured",
                                      metrics.eval_seconds, metrics.fidelity)
        constraints = self.constraints.values(metrics) if values is not None else ()
        names = self.constraints.names
        record = metrics.to_dict()
        record["constraints"] = dict(zip(names, constraints))
        if cached_from is not None:
            record["cached_from"] = cached_from
        trial.set_user_attr("metrics", _jsonable(record))
        if values is not None:
            for name, value in zip(names, constraints):
                trial.set_constraint(name, value)
            trial.study.tell(trial, list(values))
        else:
            trial.study.tell(trial, state=TrialState.FAIL)
        return Outcome(proposal, metrics, values, constraints, number=trial.number)

    def fail_stale(self, record: TrialRecord, reason: str) -> None:
        """Mark a RUNNING trial of a dead launcher FAIL (not counted in the budget)."""
        self.storage.set_trial_user_attr(record.trial_id, "stale", reason)
        self.storage.set_trial_state_values(record.trial_id, TrialState.FAIL)

    def fail_over_budget(self, trial_id: int, reason: str) -> None:
        """[reliability fix] Mark a just-created trial FAIL (user attr ``over_budget``, not
        counted): other launchers filled the budget between this launcher's check and the
        trial's creation. Optuna cannot delete a trial; this is the only way to take it back.
        """
        self.storage.set_trial_user_attr(trial_id, "over_budget", reason)
        self.storage.set_trial_state_values(trial_id, TrialState.FAIL)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
