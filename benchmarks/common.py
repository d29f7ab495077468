"""Helpers shared by every benchmark: machine description, git commit, JSON result files."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def git_commit() -> dict[str, Any]:
    """HEAD commit of the repository and whether the work tree had local changes."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: cores, torch threads, library versions."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]  # other work on the machine
    except OSError:
        pass
    for name in ("ray", "torch_pruning", "optuna"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", None)
        except ImportError:
            info[name] = None
    return info


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


def write_result(name: str, results: Mapping[str, Any], *, config: Mapping[str, Any] | None = None,
                 out_dir: str | Path | None = None, markdown: str | None = None) -> Path:
    """Write ``benchmarks/results/<name>.json`` with machine info and commit; return its path.

    With ``markdown``, also write it to ``<name>.md`` beside the JSON and print it.
    """
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git": git_commit(),
        "machine": machine_info(),
        "config": _jsonable(dict(config or {})),
        "results": _jsonable(dict(results)),
    }
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    if markdown is not None:
        md_tmp = out / f"{name}.md.tmp"
        md_tmp.write_text(markdown)
        os.replace(md_tmp, out / f"{name}.md")
        print(markdown)
    return path


def result_name(benchmark: str, quick: bool) -> str:
    """The result file stem: ``<benchmark>``, or ``<benchmark>_quick`` for a smoke run (so it
    never overwrites a full result)."""
    return f"{benchmark}_quick" if quick else benchmark


def write_and_report(benchmark: str, quick: bool, results: Mapping[str, Any], *, config: Mapping[str, Any],
                     out_dir: str | Path, markdown: str | None = None) -> Path:
    """:func:`write_result` under :func:`result_name`, then one stderr line saying where and how long."""
    path = write_result(result_name(benchmark, quick), results, config=config, out_dir=out_dir, markdown=markdown)
    written = f"{path} and {path.with_suffix('.md')}" if markdown is not None else str(path)
    print(f"wrote {written} in {config['wall_seconds']} s", file=sys.stderr)
    return path


def base_parser(description: str) -> argparse.ArgumentParser:
    """Argument parser with the options every benchmark accepts (``--quick``, ``--out``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny run (< 1 min) for CI smoke tests")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON result (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return parser


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
