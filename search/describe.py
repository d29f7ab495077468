"""``prunesearch describe CONFIG``: the search space before any trial runs.

What it shows: the channel groups found (name, channels, member layers), the groups left out
and why (``spaces.groups`` logs each exclusion; they are collected here while the space is
built, plus the layers never pruned: the model's output layers and ``[space] ignored``), the
unpruned base model's metrics and cost (``search.baseline.measure_base``, on the study's
evaluation setting), the FLOPs and params ratios the space can reach (every group at
``ratio_min`` .. every group at ``ratio_max``, from the analytic cost model) and whether each
constraint is reachable. Nothing is written to the study's storage; loading the task may
train and cache its base model, as a run would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

from search.config import StudyConfig

_EXCLUDED = re.compile(r"channel group '(?P<name>[^']*)' excluded: (?P<reason>.*)")


class _Exclusions(logging.Handler):
    """Collects the exclusions ``spaces.groups`` logs while groups are discovered."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.found: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = _EXCLUDED.match(record.getMessage())
        if match:
            self.found.append({"name": match["name"], "reason": match["reason"]})


@contextlib.contextmanager
def _collect_exclusions() -> Iterator[_Exclusions]:
    logger = logging.getLogger("spaces.groups")
    handler, level = _Exclusions(), logger.level
    logger.addHandler(handler)
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _never_pruned(config: StudyConfig, task: Any) -> list[dict[str, str]]:
    from spaces.groups import output_layers

    outputs = output_layers(task.base_model(), task.example_inputs)
    rows = [{"name": n, "reason": "produces the model's output: never pruned"} for n in outputs]
    return rows + [{"name": n, "reason": "listed in [space] ignored"} for n in config.space.ignored if n not in outputs]


def _constraint(name: str, bound: float, reach: dict[str, float], base: dict[str, Any] | None) -> dict[str, Any]:
    """Whether one constraint can be met, judged before any trial runs."""
    if name in ("max_flops_ratio", "max_params_ratio"):
        smallest = reach["min_" + name.removeprefix("max_")]
        ok = bound >= smallest - 1e-12
        return {"name": name, "bound": bound, "reachable": ok,
                "why": f"the smallest policy reaches {smallest:.4f}" + ("" if ok else ": raise it or lower [space] ratio_min")}
    if name == "min_accuracy" and base is not None:
        ok = base["accuracy"] >= bound
        return {"name": name, "bound": bound, "reachable": ok,
                "why": f"the unpruned model scores {base['accuracy']:.4f}; pruned models rarely score more"}
    return {"name": name, "bound": bound, "reachable": None, "why": "only trials can tell (measured per trial)"}


def describe_study(config: StudyConfig) -> dict[str, Any]:
    """Everything ``prunesearch describe`` shows, as plain data (the ``--json`` output)."""
    from search.baseline import measure_base
    from search.setup import load_task_and_space

    with _collect_exclusions() as exclusions:
        task, space = load_task_and_space(config)
    base = measure_base(config, task)
    cost, top = space.base_cost, space.uniform(space.ratio_max)
    small = space.predict_cost(space.uniform(space.ratio_min))
    large = space.predict_cost(top)
    reach = {"min_flops_ratio": small.flops / cost.flops, "max_flops_ratio": large.flops / cost.flops,
             "min_params_ratio": small.params / cost.params, "max_params_ratio": large.params / cost.params}
    bounds = {n: float(getattr(config.constraints, n)) for n in config.constraints.names}
    return {
        "study": config.name,
        "task": config.task.name,
        "groups": [{"name": g.name, "channels": g.channels, "unit": g.unit, "members": list(g.members)}
                   for g in space.groups],
        "excluded": exclusions.found + _never_pruned(config, task),
        "ratios": {"min": space.ratio_min, "max": space.ratio_max, "step": space.ratio_step},
        "base": base,
        "base_cost": {"flops": cost.flops, "params": cost.params},
        "reach": reach,
        "constraints": [_constraint(n, b, reach, base) for n, b in bounds.items()],
        "fill_levels": list(config.fill_levels),
    }


def format_description(d: dict[str, Any]) -> str:
    """The human-readable form of ``describe_study``'s data."""
    from search.baseline import format_base

    width = max([len(g["name"]) for g in d["groups"]] + [5])
    r = d["ratios"]
    lines = [f"study {d['study']}: task {d['task']}",
             f"{len(d['groups'])} channel groups (remaining ratio {r['min']:g}..{r['max']:g} step {r['step']:g}):"]
    lines += [f"  {g['name']:<{width}}  {g['channels']:>5} ch" + (f" x{g['unit']}" if g["unit"] > 1 else "")
              + f"  members: {', '.join(g['members'])}" for g in d["groups"]]
    lines.append(f"excluded ({len(d['excluded'])}):" if d["excluded"] else "excluded: none")
    lines += [f"  {e['name']}: {e['reason']}" for e in d["excluded"]]
    lines.append(f"unpruned base model: {format_base(d['base'])}")
    lines.append(f"base cost (analytic): {d['base_cost']['flops'] / 1e6:.3f} MFLOPs, "
                 f"{d['base_cost']['params'] / 1e6:.4f} M params")
    reach = d["reach"]
    lines.append(f"reachable: flops_ratio {reach['min_flops_ratio']:.4f}..{reach['max_flops_ratio']:.4f}, "
                 f"params_ratio {reach['min_params_ratio']:.4f}..{reach['max_params_ratio']:.4f}")
    labels = {True: "reachable", False: "UNREACHABLE", None: "unknown"}
    lines += [f"constraint {c['name']} = {c['bound']:g}: {labels[c['reachable']]} ({c['why']})" for c in d["constraints"]]
    if not d["constraints"]:
        lines.append("constraints: none")
    if d.get("fill_levels"):
        lines.append(f"[fill]: every proposal grown to the FLOPs level above it: "
                     f"{', '.join(f'{lv:g}' for lv in d['fill_levels'])}")
    return "\n".join(lines)


def cmd_describe(args: argparse.Namespace) -> int:
    from search.cli import _load

    config = _load(args)
    data = describe_study(config)
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else format_description(data))
    return 0


def add_describe(sub: Any, config_help: str) -> None:
    """The ``describe`` subcommand of ``search.cli``'s parser."""
    parser = sub.add_parser("describe", help="the search space before any trial: groups, exclusions, base model, "
                                             "reachable FLOPs, constraints")
    parser.add_argument("config", help=config_help)
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    parser.set_defaults(func=cmd_describe)
