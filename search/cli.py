"""``prunesearch`` command line: run | status | describe | export | verify | dashboard.

Exit codes: 0 success; 2 bad input (config, command line, plugin, storage URL, export
directory, a dashboard port in use, a resume with changed settings) — one line
``prunesearch: error: <what, where, what to do>`` on stderr and nothing written to the
study storage; 1 a runtime failure — the same one-line form plus the path of the log file
holding the traceback; 130 interrupted; 141 (what a process killed by SIGPIPE reports)
when the reader of stdout went away (``prunesearch status ... | head``), with no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from search.config import ConfigError, StudyConfig, load_config
from search.report import accuracy_note, format_budget, format_front, format_states

__all__ = ["build_parser", "format_front", "format_states", "main"]

PROG = "prunesearch"
_PACKAGES = ("search", "evaluators", "spaces")


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line instead of usage + message + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _ArgumentError(f"{message} (see `{self.prog} --help`)")


def _error(message: str) -> None:
    line = " ".join(str(message).split())
    print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


_CONFIG_HELP = "study TOML file"
_STORAGE_HELP = "override [study] storage (database URL or .journal path)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prunesearch")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _add_run(sub: Any) -> None:
    run = sub.add_parser("run", help="run or resume the study described by CONFIG")
    run.add_argument("config", help=_CONFIG_HELP)
    run.add_argument("--n-trials", type=_int, help="override [study] n_trials (finished trials of the whole study)")
    run.add_argument("--timeout", type=_number, help="override [study] timeout_s (seconds)")
    run.add_argument("--workers", type=_int, help="override [study] workers")
    run.add_argument("--storage", help=_STORAGE_HELP)
    run.add_argument("--ray-address", help="join a Ray cluster ('auto', or host:port); default: RAY_ADDRESS or local")
    run.add_argument("--seed", type=_int, help="override [study] seed")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--allow-changed-constraints", action="store_true",
                     help="resume a study whose [constraints] changed: re-judge every trial's feasibility "
                          "from its stored metrics (rewrites the study's constraint values)")
    run.set_defaults(func=cmd_run)


def _add_reports(sub: Any) -> None:
    from search.describe import add_describe

    status = sub.add_parser("status", help="trials by state and searcher, the base model and the Pareto front")
    status.add_argument("config", help=_CONFIG_HELP)
    status.add_argument("--storage", help=_STORAGE_HELP)
    status.set_defaults(func=cmd_status)
    add_describe(sub, _CONFIG_HELP)

    export = sub.add_parser("export", help="export the feasible Pareto trials as models")
    export.add_argument("config", help=_CONFIG_HELP)
    export.add_argument("--out", help="output directory (default: [export] dir / <study name>)")
    export.add_argument("--finetune-steps", type=_int, help="override [export] finetune_steps")
    export.add_argument("--formats", help="comma-separated: pt2,onnx (override [export] formats)")
    export.add_argument("--storage", help=_STORAGE_HELP)
    export.set_defaults(func=cmd_export)

    verify = sub.add_parser("verify", help="check an exported model for the study's structural watermark")
    verify.add_argument("config", help="study TOML file with a [watermark] section")
    verify.add_argument("export_dir", nargs="?", help="an exported trial directory (trial-<n>/)")
    verify.add_argument("--capacity", action="store_true", help="print the watermark capacity of the space and exit")
    verify.set_defaults(func=cmd_verify)

    from search.dashboard import cmd_dashboard

    dash = sub.add_parser("dashboard", help="serve optuna-dashboard on the study storage")
    dash.add_argument("config", help=_CONFIG_HELP)
    dash.add_argument("--port", type=_int, default=8080, help="TCP port to serve on (default: 8080)")
    dash.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    dash.add_argument("--storage", help=_STORAGE_HELP)
    dash.set_defaults(func=cmd_dashboard)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="AutoML search for channel-pruning policies.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the installed prunesearch version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run(sub)
    _add_reports(sub)
    return parser


# -- logging -----------------------------------------------------------------------------
class _LogSetup:
    """INFO and up of our packages into the study's log file; warnings also to stderr."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handlers: list[logging.Handler] = []

    def __enter__(self) -> "_LogSetup":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(self.path, encoding="utf-8", delay=True)
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
        self.handlers = [file_handler, console]
        self.previous = {}
        for name in _PACKAGES:
            logger = logging.getLogger(name)
            self.previous[name] = logger.level
            logger.setLevel(logging.INFO)
            for h in self.handlers:
                logger.addHandler(h)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in _PACKAGES:
            logger = logging.getLogger(name)
            for h in self.handlers:
                logger.removeHandler(h)
            logger.setLevel(self.previous.get(name, logging.NOTSET))
        for h in self.handlers:
            h.close()


def _load(args: argparse.Namespace, **overrides: Any) -> StudyConfig:
    config = load_config(args.config)
    if getattr(args, "storage", None) is not None:
        overrides["storage"] = args.storage
    try:
        return config.with_overrides(**overrides)
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: command-line override: {exc}") from None


# -- commands ----------------------------------------------------------------------------
def _quiet_ray_token_notice(args: argparse.Namespace) -> None:
    """Ray 2.5x enables token authentication on every new local cluster and logs "Token
    authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out" unless
    ``RAY_AUTH_MODE`` is set. A local run keeps that default (token auth on) by setting it
    explicitly, which is what silences the notice; a user's own RAY_AUTH_MODE wins, and
    joining a cluster is left to the cluster's own setting."""
    if not args.ray_address and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def cmd_run(args: argparse.Namespace) -> int:
    from search.baseline import format_base
    from search.runner import run_study
    from search.setup import prepare

    config = _load(args, n_trials=args.n_trials, timeout_s=args.timeout, workers=args.workers, seed=args.seed)
    _quiet_ray_token_notice(args)
    with _LogSetup(config.study.log_path) as logs:
        args._log_path = logs.path
        prepared = prepare(config, allow_changed_constraints=args.allow_changed_constraints)
        summary = run_study(config, ray_address=args.ray_address, progress=not args.no_progress, prepared=prepared)
    budget = f"/{summary.n_trials}" if summary.n_trials else ""
    if summary.rejudged is not None:
        print(f"study {summary.study_name}: every trial re-judged under the new [constraints]; "
              f"{summary.rejudged} changed feasibility")
    print(f"study {summary.study_name}: {summary.finished}{budget} trials finished "
          f"({summary.new_trials} new: {summary.evaluations} evaluated, {summary.cached} cached; "
          f"{summary.stale_failed} stale failed) in {summary.elapsed_s:.1f} s; storage {summary.storage_url}")
    print(f"unpruned base model: {format_base(summary.base)}")
    print(format_front(summary.front, config.study.objectives, summary.base,
                       accuracy_note(config.evaluation, summary.base)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import optuna

    from search.baseline import format_base, stored_base
    from search.records import pareto_front
    from search.storage import STUDY_ATTR_N_TRIALS, read_study
    from search.study_change import ALLOW_FLAG, constraint_changes

    config = _load(args)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    summary, records = read_study(config, source=args.config)
    attrs = summary.user_attrs
    counted = sum(r.evaluated for r in records)
    budget = format_budget(counted, config.study.n_trials, attrs.get(STUDY_ATTR_N_TRIALS))
    print(f"study {config.name} ({config.study.storage_url}): {len(records)} trials, {budget}")
    changes = constraint_changes(attrs, records, config)
    if changes:
        print(f"note: the trials were judged with other [constraints] than {args.config} sets "
              f"({'; '.join(changes)}); `prunesearch run {args.config} {ALLOW_FLAG}` re-judges them")
    base = stored_base(attrs)
    print(f"unpruned base model: {format_base(base)}")
    print(format_states(records))
    print(format_front(pareto_front(records, config.study.directions), config.study.objectives, base,
                       accuracy_note(config.evaluation, base)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from search.baseline import format_base
    from search.export import export_study

    config = _load(args)
    formats = None
    if args.formats is not None:
        formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
        if not formats:
            raise ConfigError("--formats is empty: give e.g. --formats pt2 or --formats pt2,onnx")
    with _LogSetup(config.study.log_path) as logs:
        args._log_path = logs.path
        summary = export_study(config, out=args.out, finetune_steps=args.finetune_steps, formats=formats)
    print(f"exported {len(summary.trials)} Pareto trial(s) of {config.name} to {summary.out}")
    print(f"  unpruned base model: {format_base(summary.base)}")
    print(f"  ({accuracy_note(config.evaluation, summary.base)})")
    for n in summary.trials:
        m = summary.metrics[n]
        drop = m["drop"]["accuracy_drop"]
        repeats = m.get("recorded_repeats", 1)
        over = f", the mean of {repeats} fine-tunes; this model is the first" if repeats > 1 else ""
        print(f"  trial-{n}: proxy {_measured(m['remeasured'], True)} (recorded {_measured(m['recorded'])}{over}), "
              f"exported {_measured(m['exported'])} {m['exported_fidelity']}"
              + (f" (drop vs base {drop:+.4f})" if drop is not None else "")
              + f", flops_ratio {m['exported']['flops_ratio']:.4f}")
    print(f"  plot: {summary.plot}")
    return 0


def _measured(metrics: dict, named: bool = False) -> str:
    """``accuracy 0.9833`` (the name only when ``named``), or every task metric with its name."""
    from search.baseline import quality_text

    values = metrics.get("values") or {"accuracy": metrics.get("accuracy")}
    return quality_text(metrics) if named or list(values) != ["accuracy"] else f"{values['accuracy']:.4f}"


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when the model carries the key's mark (p < alpha), 1 when it does not."""
    from search.setup import build_watermark, load_task_and_space
    from spaces import watermark as wmk

    config = _load(args)
    if config.watermark is None:
        raise ConfigError("no [watermark] section: add key_file and message to verify a mark")
    if not args.capacity and args.export_dir is None:
        raise ConfigError("give an export directory to verify, or --capacity")
    export_dir = Path(args.export_dir) if args.export_dir else None
    if export_dir is not None and not export_dir.is_dir():
        raise ConfigError(f"export directory {str(export_dir)!r} not found")
    _, space = load_task_and_space(config)
    if args.capacity:
        capacity = wmk.space_capacity(space, config.watermark)
        print(capacity.describe({g.name: g.channels for g in space.groups}))
        return 0
    mark = build_watermark(config, space)
    try:
        counts = wmk.channel_counts_from_export_dir(export_dir, space.groups)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    result = mark.verify(counts)
    print(result.describe())
    with contextlib.suppress(FileNotFoundError, ValueError):
        for problem in mark.manifest_mismatches(wmk.read_manifest(export_dir)):
            print(f"  watermark.json: {problem}")
    return 0 if result.passed else 1


def _stdout_gone() -> int:
    """The reader of stdout went away (``status ... | head``): the way Python's docs
    recommend, point stdout at /dev/null so the interpreter's final flush cannot raise
    again, and exit quietly with what a process killed by SIGPIPE reports (128 + 13)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prunesearch`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ArgumentError as exc:
        _error(str(exc))
        return 2
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    args._log_path = None
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe fails here, inside the handler, not at interpreter exit
        return code
    except BrokenPipeError:
        return _stdout_gone()
    except ConfigError as exc:
        message = str(exc)
        config = getattr(args, "config", None)
        if config and not message.startswith(str(config)):  # say where, once
            message = f"{config}: {message}"
        _error(message)
        return 2
    except KeyboardInterrupt:
        _error("interrupted; run the same command again to resume")
        return 130
    except Exception as exc:  # a runtime failure: one line here, the traceback in the log
        path = args._log_path or Path("studies/logs/prunesearch.log")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR {PROG} {args.command} failed\n")
                f.write(traceback.format_exc())
        except OSError:
            path = Path("(log could not be written)")
        _error(f"{args.command} failed: {type(exc).__name__}: {exc} (traceback in {path})")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
