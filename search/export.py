"""Pareto front -> real, smaller models on disk.

For every feasible Pareto trial, ``<out>/trial-<n>/`` holds

* ``policy.json``  — the policy (remaining ratio per group, method, recovery);
* ``metrics.json`` — the metrics recorded in the study, the same model re-measured here,
  (with ``finetune_steps`` > 0) the metrics after the export fine-tune (``exported``, and
  ``exported_fidelity`` saying which of the two it is), the unpruned base model's metrics
  (``base``, the study's user attr; see ``search.baseline``) and the exported model against
  it (``drop``: ``accuracy_drop`` = base - exported, ``flops_ratio``, ``params_ratio``),
  its CPU latency against the base at batch 1 and ``[latency] batch`` (``latency``), what
  ``load_pruned`` needs (``architecture``) and every file of the directory (``files``);
* ``weights.pt``   — the state_dict, loadable with ``torch.load(..., weights_only=True)``;
  the module is rebuilt, never unpickled: ``load_pruned(dir, build_model)`` from the model
  factory alone (for deployment), ``load_exported(dir, task)`` from the study's task;
* ``model.pt2``    — ``torch.export`` program with a dynamic batch dimension (with ``"pt2"``
  in formats; load with ``torch.export.load(path).module()``);
* ``model.onnx``   — only with ``"onnx"`` in formats (the ``prunesearch[onnx]`` extra): a
  dynamic batch axis, checked in onnxruntime against PyTorch (``search.export_formats``);

and ``<out>/pareto.png`` plots accuracy vs FLOPs of every trial, coloured by searcher,
with the front highlighted and the unpruned base model as a marked point at FLOPs ratio 1.
``<out>`` defaults to ``[export] dir / <study name>``; an existing ``<out>`` is only
overwritten when a previous prunesearch export made it (marker file
``.prunesearch-export.json``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.nn as nn

from search.base import FULL
from search.config import ConfigError, StudyConfig
from search.export_formats import write_formats
from search.records import TrialRecord, pareto_front
from search.storage import check_compatible, read_study
from spaces.checks import check_choice, check_int
from spaces.policy import Policy

log = logging.getLogger(__name__)

MARKER = ".prunesearch-export.json"


@dataclass
class ExportSummary:
    out: Path
    trials: list[int]
    directories: list[Path]
    plot: Path
    metrics: dict[int, dict[str, Any]]
    base: dict[str, Any] | None = None


def check_formats(formats: Sequence[str]) -> None:
    if "onnx" in formats:
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"export format 'onnx' needs the {' and '.join(missing)} package(s), not installed: "
                "pip install 'prunesearch[onnx]' or drop 'onnx' from [export] formats / --formats"
            )


def prepare_out_dir(out: Path, study_name: str) -> None:
    """Refuse a directory that is not a previous prunesearch export; clear our old output."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"export path {str(out)!r} exists and is not a directory: choose another --out")
        marker = out / MARKER
        if any(out.iterdir()) and not marker.is_file():
            raise ConfigError(
                f"export directory {str(out)!r} exists and is not a prunesearch export: "
                "choose another --out or [export] dir, or empty it"
            )
        if marker.is_file():
            for child in out.iterdir():  # only what an export writes
                if child.is_dir() and child.name.startswith("trial-"):
                    shutil.rmtree(child)
                elif child.name == "pareto.png":
                    child.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError, PermissionError) as exc:
        raise ConfigError(f"cannot create export directory {str(out)!r}: {exc.strerror or exc}: choose another --out") from None
    (out / MARKER).write_text(json.dumps({"study": study_name, "created": time.time()}), encoding="utf-8")


# -- rebuilding models ---------------------------------------------------------------------
def rebuild_structure(task: Any, policy: Policy, groups: Sequence[Any] | None = None, round_to: int = 1) -> nn.Module:
    """The pruned architecture of ``policy`` (weights still the base model's)."""
    from evaluators.prune import apply_policy

    # Which channels survive does not matter: the state_dict replaces every weight. L1 needs
    # no calibration data, whatever criterion the policy was searched with.
    shape_only = Policy(ratios=dict(policy.ratios), method="l1")
    return apply_policy(task.base_model(), shape_only, task.example_inputs, groups=groups, round_to=round_to)


def load_pruned(directory: str | Path, build_model: Any, example_inputs: Any = None) -> nn.Module:
    """An exported model from its own directory and the model factory alone (no task, no
    data, no study): ``build_model()``'s unpruned architecture, its channel groups found
    again (leaving out the study's ``[space] ignored`` layers, recorded in ``metrics.json``),
    pruned to ``policy.json``'s kept channels, then ``weights.pt``. ``example_inputs``
    defaults to zeros of the recorded input shape and dtype (exports made before these were
    recorded, or with non-tensor inputs, need it given)."""
    from evaluators.prune import apply_policy
    from spaces.groups import discover_groups

    directory = Path(directory)
    policy = Policy.from_json((directory / "policy.json").read_text(encoding="utf-8"))
    info = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
    arch = info.get("architecture") or {}
    if example_inputs is None:
        if "example_input_shape" not in arch:
            raise ValueError(f"{directory}/metrics.json records no input shape: pass example_inputs")
        example_inputs = torch.zeros(arch["example_input_shape"], dtype=getattr(torch, arch["example_input_dtype"]))
    model = build_model().eval()
    groups = discover_groups(model, example_inputs, ignored=arch.get("ignored", ()))
    shape_only = Policy(ratios=dict(policy.ratios), method="l1")  # weights.pt replaces every weight
    pruned = apply_policy(model, shape_only, example_inputs, groups=groups, round_to=int(info.get("round_to", 1)))
    pruned.load_state_dict(torch.load(directory / "weights.pt", weights_only=True))
    return pruned.eval()


def load_exported(directory: str | Path, task: Any, groups: Sequence[Any] | None = None) -> nn.Module:
    """Rebuild an exported trial's model from base architecture + policy + weights.pt."""
    directory = Path(directory)
    policy = Policy.from_json((directory / "policy.json").read_text(encoding="utf-8"))
    info = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
    model = rebuild_structure(task, policy, groups=groups, round_to=int(info.get("round_to", 1)))
    state = torch.load(directory / "weights.pt", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


# -- writing -------------------------------------------------------------------------------
def architecture_of(task: Any, space: Any) -> dict[str, Any]:
    """What ``load_pruned`` needs besides the model factory: the example input's shape and
    dtype (a tensor input) and the layers the space never pruned (``[space] ignored``)."""
    x = task.example_inputs
    arch: dict[str, Any] = {"ignored": list(space.config.ignored)}
    if isinstance(x, torch.Tensor):
        arch.update(example_input_shape=list(x.shape), example_input_dtype=str(x.dtype).removeprefix("torch."))
    return arch


def export_latency(model: nn.Module, base: nn.Module, task: Any, latency: Any) -> list[dict[str, Any]]:
    """The exported model's CPU latency against the unpruned one, timed alternately
    (``evaluators.timing.measure_paired_ms``) at batch 1 and at ``[latency] batch``, with
    ``[latency]`` threads, runs and warmup; [] for inputs that are not one tensor."""
    import copy

    from evaluators import timing

    if not isinstance(task.example_inputs, torch.Tensor):
        return []
    pruned, reference = copy.deepcopy(model).cpu().eval(), copy.deepcopy(base).cpu().eval()
    rows = []
    for batch in sorted({1, int(latency.batch)}):
        inputs = timing.latency_inputs(task.example_inputs.cpu(), batch)
        ms, base_ms = timing.measure_paired_ms(pruned, reference, inputs, rounds=latency.runs,
                                               warmup=latency.warmup, threads=latency.threads)
        rows.append({"batch": batch, "device": "cpu", "threads": latency.threads, "latency_ms": ms,
                     "base_latency_ms": base_ms, "latency_ratio": ms / base_ms})
    return rows


def write_info(directory: Path, info: dict[str, Any]) -> None:
    """``metrics.json``, its ``files`` listing every file of the directory (ONNX's external
    ``model.onnx.data`` and the watermark manifest too: call again after adding one)."""
    names = {p.name for p in directory.iterdir() if p.is_file()} | {"metrics.json"}
    info["files"] = sorted(names)
    (directory / "metrics.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def exported_fidelity(finetune_steps: int) -> str:
    """What the exported model's accuracy is: the search's proxy, or after the export's fine-tune."""
    if finetune_steps > 0:
        return f"after {finetune_steps} export fine-tune steps"
    return "= the search proxy (no export fine-tune; [export] finetune_steps / --finetune-steps adds one)"


def export_trial(record: TrialRecord, task: Any, space: Any, settings: Any, directory: Path, *,
                 finetune_steps: int = 0, formats: Sequence[str] = ("pt2",),
                 base_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    from evaluators.build import build_pruned, calibration_batches, seeded
    from search.baseline import drop
    from evaluators.evaluate import evaluate_model
    from evaluators.recover import recover

    policy = record.policy
    base = task.base_model()
    # a promoted trial's metrics come from its rung's fine-tune (and samples): rebuild and score it that way
    built = settings.replace(**record.eval_overrides) if record.eval_overrides else settings
    model = build_pruned(policy, task, built, groups=space.groups, round_to=space.round_to, base=base)
    remeasured = evaluate_model(model, task, built)
    exported = remeasured
    if finetune_steps > 0:
        ft = settings.replace(recovery="finetune", finetune_steps=finetune_steps)
        with seeded(settings):
            model = recover("finetune", model, base=base, task=task, settings=ft,
                            calibration=calibration_batches(task, ft)).eval()
        exported = evaluate_model(model, task, built)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.json").write_text(json.dumps(policy.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    torch.save(model.state_dict(), directory / "weights.pt")
    info = {
        "trial": record.number,
        "searcher": record.searcher,
        "generation": record.generation,
        "fidelity": record.fidelity,
        "task": task.name,
        "round_to": space.round_to,
        "recorded": record.metrics.to_dict() if record.metrics else None,
        # a rung with repeats records the mean of that many fine-tunes; the model built here is its first seed's
        "recorded_repeats": built.repeats,
        "remeasured": remeasured.to_dict(),
        "export_finetune_steps": finetune_steps,
        "exported_fidelity": exported_fidelity(finetune_steps),
        "exported": exported.to_dict(),
        "base": base_metrics,
        "drop": drop(exported.to_dict(), base_metrics),
        "settings": settings.to_dict(),
        "architecture": architecture_of(task, space),
        "latency": export_latency(model, base, task, settings.latency),
    }
    info.update(write_formats(model, task, directory, formats))
    write_info(directory, info)
    return info


def plot_pareto(records: Sequence[TrialRecord], front: Sequence[TrialRecord], path: Path, *,
                max_flops_ratio: float | None = None, title: str = "", base: dict[str, Any] | None = None,
                metric: str = "accuracy") -> Path:
    """Task metric ``metric`` (accuracy by default) vs FLOPs ratio of every COMPLETE trial, by
    searcher; the front highlighted; ``base`` (the unpruned model's metrics) a marked point at
    FLOPs ratio 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def y(m: Any) -> float | None:  # a Metrics or the stored base; older ones have no values: their accuracy
        d = m if isinstance(m, dict) else m.to_dict()
        return (d.get("values") or {}).get(metric, d.get(metric))

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    done = [r for r in records if r.state == optuna.trial.TrialState.COMPLETE and r.metrics is not None
            and y(r.metrics) is not None and r.metrics.flops_ratio is not None]
    searchers = sorted({r.searcher for r in done})
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(searchers):
        for fidelity, marker_face in ((FULL, None), ("other", "none")):
            pts = [r for r in done if r.searcher == name and ((r.fidelity == FULL) == (fidelity == FULL))]
            if not pts:
                continue
            label = name if fidelity == FULL else f"{name} (cheap)"
            colour = colours(i % 10)
            ax.scatter([r.metrics.flops_ratio for r in pts], [y(r.metrics) for r in pts], s=18,
                       edgecolors=[colour], facecolors=[colour] if marker_face is None else "none",
                       alpha=0.8, label=label)
    if front:
        xs = [r.metrics.flops_ratio for r in front]
        ys = [y(r.metrics) for r in front]
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [ys[i] for i in order], "-", color="black", lw=1, drawstyle="steps-post")
        ax.scatter(xs, ys, s=70, facecolors="none", edgecolors="red", linewidths=1.5, label="Pareto front", zorder=5)
    if base is not None and y(base) is not None:
        ax.scatter([1.0], [y(base)], s=120, marker="*", color="gold", edgecolors="black", zorder=6,
                   label=f"unpruned base ({y(base):.4f})")
    if max_flops_ratio is not None:
        ax.axvline(max_flops_ratio, color="grey", ls="--", lw=1, label=f"max FLOPs ratio {max_flops_ratio}")
    ax.set_xlabel("FLOPs ratio (pruned / base)")
    ax.set_ylabel(f"proxy {metric}")
    ax.set_title(title or "trials and Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def export_study(config: StudyConfig, *, out: str | Path | None = None, finetune_steps: int | None = None,
                 formats: Sequence[str] | None = None, task_and_space: tuple[Any, Any] | None = None) -> ExportSummary:
    """Export every feasible Pareto trial of ``config``'s study (storage is only read)."""
    from search.baseline import measure_base, stored_base
    from search.objectives import quality_names
    from search.setup import build_watermark, check_device, fingerprint_of, load_task_and_space
    from search.study_change import check_constraints

    formats = tuple(formats if formats is not None else config.export.formats)
    steps = config.export.finetune_steps if finetune_steps is None else finetune_steps
    try:
        for f in formats:
            check_choice("export format", f, ("pt2", "onnx"))
        check_int("export finetune_steps", steps, 0)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_formats(formats)
    check_device(config, on_cluster=False)  # the rebuild runs here: refuse a device this machine lacks
    out = Path(out) if out is not None else Path(config.export.dir) / config.name
    summary, records = read_study(config)
    front = pareto_front(records, config.study.directions)
    if not front:
        raise ConfigError(f"study {config.name!r} has no feasible full-fidelity Pareto trial to export yet")
    task, space = task_and_space if task_and_space is not None else load_task_and_space(config)
    check_compatible(summary, fingerprint=fingerprint_of(config, space, task), objectives=config.study.objectives,
                     evaluation=config.evaluation.to_dict(), where=config.study.storage_url)
    check_constraints(config, command="export")  # a front judged with other bounds is refused
    # a study set up before base metrics were stored: measured here (export only reads storage)
    base = stored_base(summary.user_attrs) or measure_base(config, task)
    prepare_out_dir(out, config.name)
    settings = config.evaluation.replace(threads=config.study.threads_per_worker)
    if config.uses_latency:  # search used the lookup table; the exported models are timed for real
        settings = settings.replace(measure_latency=True, latency=config.latency, threads=config.latency.threads)
    watermark = build_watermark(config, space)
    dirs, metrics = [], {}
    for record in front:
        directory = out / f"trial-{record.number}"
        metrics[record.number] = export_trial(record, task, space, settings, directory,
                                              finetune_steps=steps, formats=formats, base_metrics=base)
        if watermark is not None:  # bit count, carriers, message hash: never the key
            from spaces.watermark import write_manifest

            write_manifest(directory, watermark)
            write_info(directory, metrics[record.number])  # lists the manifest too
        dirs.append(directory)
        log.info("exported trial %d to %s", record.number, directory)
    plot = plot_pareto(records, front, out / "pareto.png", max_flops_ratio=config.constraints.max_flops_ratio,
                       title=f"{config.name}: {len(records)} trials, {len(front)} on the front", base=base,
                       metric=next((n for n in quality_names(config) if n in task.metric_directions),
                                   next(iter(task.metric_directions))))
    with contextlib.suppress(OSError):
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
        marker["trials"] = [r.number for r in front]
        (out / MARKER).write_text(json.dumps(marker), encoding="utf-8")
    return ExportSummary(out=out, trials=[r.number for r in front], directories=dirs, plot=plot, metrics=metrics,
                         base=base)
