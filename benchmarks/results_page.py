"""``RESULTS.md``: the tables, plots and notes of every result file in a result directory,
with the wall time of each script and the machine the numbers were measured on."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT


def load_result(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def _read_md(out: Path, name: str, link_prefix: str) -> str | None:
    path = out / f"{name}.md"
    if not path.is_file():
        return None
    text = path.read_text().strip()
    # Plots sit next to the markdown; the README links them from the repository root.
    return text.replace("](search_quality_", f"]({link_prefix}search_quality_")


def _throughput_md(data: dict[str, Any]) -> str:
    s = data["results"]["summary"]
    return "\n".join([
        "## Evaluation throughput (digits, EvaluatorPool)", "",
        "| workers | evaluations/s | non-forward share |", "|---|---|---|",
        f"| 1 | {s['evals_per_s_1_worker']:.2f} | {100 * s['non_forward_share_1_worker']:.0f}% |",
        f"| 2 | {s['evals_per_s_2_workers']:.2f} | {100 * s['non_forward_share_2_workers']:.0f}% |",
        "", f"Speedup x{s['speedup_2_vs_1']:.2f} (target >= 1.7: {'met' if s['speedup_target_met'] else '**missed**'}).",
    ])


def _latency_md(data: dict[str, Any], png: str | None) -> str | None:
    """A short latency section; ``None`` when the file's layout is not the one known here."""
    try:
        res = data["results"]
        lines = ["## Latency", "", "| model | LUT vs measured Spearman | target | met |", "|---|---|---|---|"]
        for name, lut in res["lut"].items():
            lines.append(f"| {name} | {lut['spearman']:.2f} | {lut['target']} | {'yes' if lut['met'] else '**no**'} |")
        summary = res.get("objective", {}).get("summary", {})
        if summary:
            lines += ["", "| latency study (vs the FLOPs study, digits, 3 seeds) | faster at equal accuracy | "
                      "fastest-model ratio | measured HV | FLOPs study HV |", "|---|---|---|---|---|"]
            for arm, a in summary.items():
                ratio = a.get("mean_fastest_ratio_to_flops_study")
                hv = ", ".join(f"{v:.3f}" for v in a["measured_hypervolume"])
                hv_f = ", ".join(f"{v:.3f}" for v in a["measured_hypervolume_flops_study"])
                lines.append(f"| {arm} | {a['faster_at_equal_accuracy_in']} | "
                             f"{'-' if ratio is None else f'{ratio:.3f}'} | {hv} | {hv_f} |")
        if png:
            lines += ["", f"![latency]({png})"]
        return "\n".join(lines)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _watermark_md(data: dict[str, Any]) -> str | None:
    """A short watermark-cost section; ``None`` when the file's layout is not the one known here."""
    try:
        res = data["results"]
        s = res["summary"]
        paired, tuned = s["paired_cost_pts"], s.get("finetuned_best_cost_pts", {})
        lines = ["## Watermark cost (digits)", "",
                 f"{res['bits']}-bit mark, {res['n_trials']} trials x {len(res['seeds'])} seeds. Paired cost "
                 f"(unmarked Pareto policies vs their marked projections, scored on the held-out half of the "
                 f"validation split): {paired['mean']:.2f} +- {paired['se']:.2f} (SE) "
                 f"pts over {paired['n']} pairs (target <= {s['target_pts']}: {'met' if s['met'] else '**missed**'})."]
        inside = s.get("paired_cost_pts_in_sample")
        if inside:
            lines.append(f"On the half the studies selected on: {inside['mean']:.2f} +- {inside['se']:.2f} pts "
                         "(selection luck the projection does not inherit).")
        if tuned:
            lines.append("After the same fine-tune, best models: " + ", ".join(
                f"<= {float(k):.0%} FLOPs {v['mean']:+.2f} +- {v['se']:.2f} pts" for k, v in tuned.items()) + ".")
        return "\n".join(lines)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _wall_from_results(out: Path, quick: bool, scripts: Sequence[str]) -> list[dict[str, Any]]:
    """Per-script wall times recorded in the result files (when no bench.json was written)."""
    rows = []
    for script in scripts:
        for name in ((f"{script}_quick", script) if quick else (script,)):
            data = load_result(out, name)
            wall = (data or {}).get("config", {}).get("wall_seconds")
            if wall is not None:
                rows.append({"script": script, "wall_s": float(wall), "exit_code": 0})
                break
    return rows


def _machine_line(data: dict[str, Any]) -> str:
    m, g = data.get("machine", {}), data.get("git", {})
    commit = (g.get("commit") or "unknown")[:12] + (" (local changes)" if g.get("dirty") else "")
    load = m.get("load_average")
    return (f"{m.get('cpu_count')} CPUs, torch {m.get('torch')} ({m.get('torch_threads')} threads in the driver), "
            f"Python {m.get('python')}, commit {commit}" + (f", load average {load} at the end" if load else ""))


def results_markdown(out: Path, runs: list[dict[str, Any]] | None, quick: bool, scripts: Sequence[str]) -> str:
    """RESULTS.md from the result files in ``out`` (links relative to the repository root);
    ``scripts``: the benchmarks whose recorded wall times are listed when ``runs`` is empty."""
    try:
        prefix = out.resolve().relative_to(ROOT).as_posix() + "/"
    except ValueError:
        prefix = ""
    sq_name = "search_quality_quick" if quick else "search_quality"
    parts = ["# Results", ""]
    if quick:
        parts += ["> Quick (smoke-test) numbers: tiny budgets, one seed. Not results; run `make bench`.", ""]
    parts += ["Reproduce everything with `make bench` (full runs, results in `benchmarks/results/`) or "
              "`make bench-quick` (CI smoke run). Each script also runs alone: "
              "`python -m benchmarks.<name> [--quick]`, e.g. `python -m benchmarks.search_quality --task digits`. "
              "Every JSON file holds the raw per-seed numbers, the configuration, the machine and the commit.", ""]
    if runs:
        total = sum(r["wall_s"] for r in runs)
        parts += [f"Last `make bench{'-quick' if quick else ''}`: {total / 60:.1f} min in all ("
                  + ", ".join(f"{r['script']} {r['wall_s'] / 60:.1f} min" for r in runs) + ").", ""]
    else:
        recorded = _wall_from_results(out, quick, scripts)
        if recorded:
            parts += ["Wall time of the scripts whose result files record it: "
                      + ", ".join(f"{r['script']} {r['wall_s'] / 60:.1f} min" for r in recorded) + ".", ""]
    sq = load_result(out, sq_name)
    if sq is not None:
        parts += [f"Measured on: {_machine_line(sq)}. Timings on a shared machine are upper bounds.", ""]
        md = _read_md(out, sq_name, prefix)
        if md:
            parts += [md, ""]
        parts += notes(sq)
    # finetune_lengths writes one file per task; both it and headroom may write into a folder of their own (--out)
    parts += _collected(out, "finetune_lengths_*", quick)
    parts += _collected(out, "headroom*", quick)
    md = _read_md(out, "scaling_quick" if quick else "scaling", prefix)
    if md:
        parts += [md, ""]
    lat_name = "latency_quick" if quick else "latency"
    lat = load_result(out, lat_name)
    if lat is not None:
        md = _latency_md(lat, f"{prefix}{lat_name}.png" if (out / f"{lat_name}.png").is_file() else None)
        if md:
            parts += [md, ""]
    wm = load_result(out, "watermark_quick" if quick else "watermark")
    if wm is not None:
        md = _watermark_md(wm)
        if md:
            parts += [md, ""]
    md = _read_md(out, "proxy_correlation_quick" if quick else "proxy_correlation", prefix)
    if md:
        parts += [md, ""]
    tp = load_result(out, "eval_throughput")
    if tp is not None and "summary" in tp.get("results", {}):
        parts += [_throughput_md(tp), ""]
    if (out / ("methods_quick.md" if quick else "methods.md")).is_file():
        name = "methods_quick.md" if quick else "methods.md"
        parts += ["## Pruning methods", "", f"Criterion x recovery tables: [{prefix}{name}]({prefix}{name}).", ""]
    return "\n".join(parts).rstrip() + "\n"


def _collected(out: Path, stem: str, quick: bool) -> list[str]:
    """The markdown tables ``<stem>[_quick].md`` (a glob) found anywhere under ``out``, each
    under its heading with a link to its file (several runs share a heading); a full page
    never shows smoke runs (a ``_quick`` file or one under a ``quick`` folder)."""
    parts = []
    for path in sorted(out.rglob(f"{stem}{'_quick' if quick else ''}.md")):
        rel = path.relative_to(out)
        if quick or not (path.stem.endswith("_quick") or "quick" in rel.parts):
            heading, _, body = path.read_text().strip().partition("\n")
            parts += [heading, "", f"From [`{rel.as_posix()}`]({rel.as_posix()}).", body.strip(), ""]
    return parts


def notes(sq: dict[str, Any]) -> list[str]:
    """Plain statements of what each target showed, missed ones first."""
    targets = sq.get("results", {}).get("targets", [])
    lines = ["### Notes", ""]
    for t in sorted(targets, key=lambda t: t["met"]):
        unit = "%" if t["kind"] == "hv_vs_random" else " pts"
        if t["value"] is None:
            lines.append(f"- **Missed** ({t['task']}): {t['name']} — no method produced a value.")
            continue
        verdict = "Met" if t["met"] else "**Missed**"
        lines.append(f"- {verdict} ({t['task']}): {t['name']} = {100 * t['value']:+.1f}{unit} "
                     f"(best: {t['best']}; threshold {100 * t['threshold']:+.0f}{unit}).")
    tasks = sq.get("results", {}).get("tasks", {})
    for task, res in tasks.items():
        summary = res.get("summary", {})
        walls = {m: row["wall_s"]["mean"] for m, row in summary.items() if row.get("wall_s", {}).get("mean")}
        others = sorted(w for m, w in walls.items() if m not in ("masking", "uniform"))
        if "masking" in walls and others:
            median = others[len(others) // 2]
            lines.append(f"- {task}: a masking study took {walls['masking']:.0f} s against a median of {median:.0f} s "
                         "for the other searchers at the same trial budget: each of its trials is a training run.")
    skipped = [f"{k} ({v['skipped']})" for k, v in tasks.items() if "skipped" in v]
    if skipped:
        lines.append(f"- Not run: {', '.join(skipped)}; its targets could not be checked.")
    lines += [
        "- digits is saturated after fine-tuning: uniform and searched policies land within about a point of each "
        "other, so its fine-tuned columns cannot rank searchers; its proxy columns can.",
        "- Masking proposes one trained policy per trial; to keep the benchmark within its time budget its runs "
        "are shorter than the searcher's default (see `masking_steps` in the JSON config).",
        "- The GA spends part of its budget on cheap-fidelity trials (smaller calibration and validation sets); "
        "only its promoted full-fidelity trials enter its front and hypervolume.",
        "",
    ]
    return lines
