"""Launchers of a study: who runs it, whether they are alive, and which trials hold a place
in the study's budget.

Every ``prunesearch run`` process registers itself in the study's system attrs
(``prunesearch:launcher:<run id>`` -> host, pid, heartbeat) and refreshes its heartbeat while
it runs. Several launchers on one study share one budget (``n_trials``), so a launcher
counts the trials of every live launcher (``claimed_trials``), not only its own.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

LAUNCHER_PREFIX = "prunesearch:launcher:"
HEARTBEAT_S = 30.0
# A launcher on another host is presumed dead when its heartbeat is older than this.
GRACE_S = 4 * HEARTBEAT_S


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
    alive: a sampler's trial (``search.recorder.TrialSource``) exists a moment before the
    recorder writes its ``run`` attr; with no other launcher alive it is a dead launcher's
    leftover.
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
