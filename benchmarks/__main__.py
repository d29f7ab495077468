"""Run every benchmark, each as its own process, then write the README's Results section.

    python -m benchmarks            # make bench: full runs -> benchmarks/results/
    python -m benchmarks --quick    # make bench-quick: smoke runs -> benchmarks/results/quick/
    python -m benchmarks --only search_quality,scaling

Scripts run in order (``latency`` only when ``benchmarks/latency.py`` exists; the full run
leaves out :data:`SEPARATE`, which ``--only`` still runs); the run fails
(exit 1) when any script fails, after running the others. Afterwards
``<out>/RESULTS.md`` collects the tables and plots of the result files found in ``<out>``
and ``<out>/bench.json`` the wall time of every script (with machine info and commit).
Quick mode writes into ``benchmarks/results/quick/`` so smoke runs never overwrite the
committed full results.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, ROOT, write_result
from benchmarks.results_page import load_result, results_markdown

SCRIPTS = ("eval_throughput", "methods", "latency", "watermark", "search_quality", "finetune_lengths", "scaling",
           "proxy_correlation", "headroom")
# Run by --quick and by --only, not by the full run: their full modes (proxy_correlation
# ~25 min; finetune_lengths' 5x fine-tunes of every chosen model ~20 min per task; headroom's
# ~200 fine-tunes on shapes ~30 min) would take `make bench` past its 45-minute budget (README: Results).
SEPARATE = ("finetune_lengths", "proxy_correlation", "headroom")


def available_scripts() -> list[str]:
    """The benchmark modules present in this checkout, in run order."""
    return [s for s in SCRIPTS if (ROOT / "benchmarks" / f"{s}.py").is_file()]


def run_script(name: str, quick: bool, out: Path) -> dict[str, Any]:
    """``python -m benchmarks.<name> [--quick] --out <out>`` in a subprocess; its exit code and wall time."""
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--out", str(out)] + (["--quick"] if quick else [])
    print(f"== {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    code = subprocess.call(cmd, cwd=ROOT)
    wall = time.perf_counter() - start
    print(f"== {name}: exit {code} in {wall:.0f} s", file=sys.stderr, flush=True)
    return {"script": name, "exit_code": code, "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke runs of every script (< 5 min in all)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(available_scripts())}")
    parser.add_argument("--out", default=None, help="result directory (default benchmarks/results[/quick])")
    parser.add_argument("--report-only", action="store_true", help="only rewrite RESULTS.md from existing results")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    scripts = available_scripts()
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in scripts]
        if unknown:
            parser.error(f"unknown benchmark {unknown[0]!r} (available: {', '.join(scripts)})")
        scripts = wanted
    elif not args.quick:
        scripts = [s for s in scripts if s not in SEPARATE]
    runs: list[dict[str, Any]] = []
    if not args.report_only:
        runs = [run_script(name, args.quick, out) for name in scripts]
        write_result("bench", {"runs": runs, "total_wall_s": round(sum(r["wall_s"] for r in runs), 1)},
                     config={"quick": args.quick, "scripts": scripts}, out_dir=out)
    else:
        previous = load_result(out, "bench")
        runs = previous["results"]["runs"] if previous else []
    (out / "RESULTS.md").write_text(results_markdown(out, runs, args.quick, available_scripts()))
    failed = [r["script"] for r in runs if r["exit_code"] != 0]
    total = sum(r["wall_s"] for r in runs)
    print(f"benchmarks: {len(runs) - len(failed)}/{len(runs)} passed in {total / 60:.1f} min; "
          f"results and RESULTS.md in {out}", file=sys.stderr)
    if failed:
        print(f"benchmarks: error: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
