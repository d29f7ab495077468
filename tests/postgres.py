"""A throw-away PostgreSQL server on loopback for storage tests (Debian's postgresql package).

PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
``postgres`` system user the package creates. Skips cleanly when no server binaries exist
and CI is not set; under CI a missing server is a failure (``.ci/run`` installs it).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--"] + cmd


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a fresh cluster on 127.0.0.1:<free port>; yield a SQLAlchemy URL; stop it."""
    bindir = _bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb) not found; apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="prunesearch-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    port = _free_port()
    subprocess.run(_as_user([str(bindir / "initdb"), "-D", str(data), "-U", "prune", "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True)
    log = root / "server.log"
    subprocess.run(_as_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
                             f"-h 127.0.0.1 -p {port} -k {root}", "start"]), check=True, capture_output=True)
    try:
        subprocess.run(_as_user([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prune", "studies"]),
                       check=True, capture_output=True)
        yield f"postgresql+psycopg2://prune@127.0.0.1:{port}/studies"
    finally:
        subprocess.run(_as_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def postgres_url_or_skip() -> Iterator[str]:
    """``postgres_server()`` for a test: skipped where no server binaries exist, except
    under CI (``.ci/run`` installs them, so a missing server there is a failure)."""
    import pytest

    with ExitStack() as stack:
        try:
            url = stack.enter_context(postgres_server())
        except FileNotFoundError as exc:
            if os.environ.get("CI"):
                raise
            pytest.skip(str(exc))
        yield url
