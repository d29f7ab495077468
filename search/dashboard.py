"""``prunesearch dashboard CONFIG``: optuna-dashboard on the study's storage, telling the truth.

optuna-dashboard (0.21) computes a study's "best trials" as the non-dominated COMPLETE
trials, constraints ignored: an infeasible trial (FLOPs ratio 0.628 under a bound of 0.6)
would be shown among them. The dashboard served here computes them as ``prunesearch
status`` does (``search.records.pareto_front``: feasible, full fidelity, one trial per
policy) by giving the dashboard's app that function in place of its own; if a later
optuna-dashboard moves it, the run says so in a warning rather than serving a wrong front.
Objective names come from the study (``search.setup.open_study`` sets them).

The port is checked before anything announces "Listening on": a port in use is a one-line
error (exit 2), not a server that fails after it said it serves.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

from search.config import ConfigError

log = logging.getLogger(__name__)


def check_port_free(host: str, port: int) -> None:
    """``ConfigError`` unless ``host:port`` can be bound now (checked before anything says
    "Listening on": the server would only fail once it had announced itself)."""
    import socket

    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port: give 1-65535")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host!r} is not an address of this machine: {exc}") from None
    with socket.socket(family, kind) as probe:
        # the server sets SO_REUSEADDR too: a port left in TIME_WAIT is free for it, one in use is not
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot serve on {host}:{port}: {exc.strerror or exc}: choose another --port") from None


def feasible_front(trials: Sequence[Any], directions: Sequence[Any]) -> list[Any]:
    """The dashboard's best trials: the trials of ``status``'s Pareto front (feasible, full
    fidelity, non-dominated, one per policy), in trial-number order as the dashboard lists them."""
    from search.records import TrialRecord, pareto_front

    records = [TrialRecord.from_frozen(t) for t in trials]
    names = [getattr(d, "name", str(d)).lower() for d in directions]
    keep = {r.number for r in pareto_front(records, names)}
    return sorted((t for t in trials if t.number in keep), key=lambda t: t.number)


def use_feasible_front() -> bool:
    """Make optuna-dashboard's app compute best trials with ``feasible_front``; False (and
    a warning) where this optuna-dashboard has no such function to replace."""
    try:
        from optuna_dashboard import _app
    except ImportError:
        _app = None
    if _app is None or not callable(getattr(_app, "get_pareto_front_trials", None)):
        log.warning("this optuna-dashboard computes best trials elsewhere: its best trials may include "
                    "infeasible ones; `prunesearch status` shows the feasible front")
        return False
    _app.get_pareto_front_trials = feasible_front
    return True


def cmd_dashboard(args: argparse.Namespace) -> int:
    import optuna_dashboard

    from search.cli import _load
    from search.storage import open_storage, parse_storage, read_study

    config = _load(args)
    read_study(config, source=args.config)  # ConfigError when there is no such study
    check_port_free(args.host, args.port)
    use_feasible_front()
    storage = open_storage(parse_storage(config.study.storage_url))
    print(f"optuna-dashboard for study {config.name} at http://{args.host}:{args.port}/dashboard (Ctrl-C stops)",
          flush=True)
    try:
        optuna_dashboard.run_server(storage, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # taken between the check and the server's bind
        raise ConfigError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}: choose another --port") from None
    return 0
