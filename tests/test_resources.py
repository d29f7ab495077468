"""Ray resources of a run: every searcher's own Ray tasks get CPUs next to the evaluation
workers (``prunesearch run`` with default Ray), a cluster that could never schedule them is
refused before anything is written, and background work that never starts stops the run."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest

import search.driver
from evaluators.pool import check_cluster_cpus
from search.base import Proposal, RayResources, Searcher, make_searcher
from search.budget import Budget
from search.config import load_config
from search.driver import Driver, Plan, SearcherStalled, bind_searchers, check_stalled, run_loop
from search.records import read_trials
from search.setup import make_searchers, ray_cpus
from tests.fakes import DIRECTIONS, FakePool, Harness, tiny_config, tiny_space

ROOT = Path(__file__).resolve().parents[1]

MASKING = """
    [[searchers]]
    kind = "masking"
    {share}
    [searchers.options]
    steps = 3
    targets = [0.3, 0.5]
    all_targets = true
    parallel = {parallel}
    """

PORTFOLIO = """
    [[searchers]]
    kind = "tpe"
    share = 0.4
    [searchers.options]
    n_startup_trials = 2
    uniform_start = 2
    [[searchers]]
    kind = "nsga2"
    share = 0.2
    [searchers.options]
    population_size = 4
    [[searchers]]
    kind = "genetic"
    share = 0.3
    [searchers.options]
    population = 4
    top_k = 2
    sensitivity_ratios = []
    """ + MASKING.format(share="share = 0.1", parallel=1)


def _config(tmp_path: Path, searchers: str, n_trials: int, workers: int = 2) -> Path:
    path = tiny_config(tmp_path, n_trials=n_trials, searchers=searchers, journal=True)
    path.write_text(path.read_text().replace("seed = 0", f"seed = 0\nworkers = {workers}", 1))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    return env


def _run_cli(script: str, timeout: float) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python (a fresh Ray), from the repository root."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _per_searcher(config_path: Path) -> collections.Counter:
    config = load_config(config_path)
    study = optuna.load_study(study_name=config.name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(config.study.storage_url)))
    return collections.Counter(r.searcher for r in read_trials(study) if r.evaluated)


# -- the resource rule -----------------------------------------------------------------------
def test_cluster_check_refuses_tasks_the_workers_leave_no_room_for():
    with pytest.raises(ValueError, match=r"searcher 'masking' runs Ray tasks of 1 CPU\(s\), but the evaluation "
                                         r"workers \(2 x 1 thread\(s\)\) hold 2 of the Ray cluster's 2 CPUs"):
        check_cluster_cpus(2.0, 2, 1, {"searcher 'masking'": (1, 1)})
    # a task wider than what the placed workers leave (3 CPUs: 2 held, 1 free)
    with pytest.raises(ValueError, match="tasks of 2 CPU"):
        check_cluster_cpus(3.0, 2, 1, {"searcher 'masking'": (1, 2)})


def test_cluster_check_warns_when_work_only_queues():
    warning = check_cluster_cpus(3.0, 2, 1, {"searcher 'masking'": (2, 1)})
    assert warning == ("the run asks for 4 Ray CPUs (evaluation workers and searchers' tasks) but the Ray "
                       "cluster has 3; some of that work will queue")
    assert check_cluster_cpus(4.0, 2, 1, {"searcher 'masking'": (2, 1)}) is None
    assert check_cluster_cpus(2.0, 2, 1, {"searcher 'tpe'": (0, 1)}) is None


def test_study_cpus_are_workers_plus_every_searchers_tasks(tmp_path):
    config = load_config(_config(tmp_path, PORTFOLIO.replace("parallel = 1", "parallel = 2\nthreads = 2"),
                                 n_trials=8, workers=3))
    searchers = make_searchers(config, tiny_space(), _tiny_task())
    assert searchers["masking"].ray_resources() == RayResources(tasks=2, cpus_per_task=2)
    assert searchers["tpe"].ray_resources().cpus == 0
    assert ray_cpus(config, searchers) == 3 * 1 + 2 * 2


def _tiny_task():
    from tests.fakes import tiny_task

    return tiny_task()


@pytest.mark.parametrize("study_file, method", [("portfolio.toml", "portfolio"),
                                                ("masking_promoted.toml", "masking_mixed_promoted")])
def test_shipped_study_files_are_the_benchmarks_methods(study_file, method):
    """The study files under studies/ are the benchmark's methods on shapes, key for key."""
    from benchmarks.quality_presets import PRESETS, BenchConfig

    shipped = load_config(ROOT / "studies" / study_file)
    bench = BenchConfig(task="shapes", preset=PRESETS["shapes"]).study_config(method, 0, Path("."))
    assert [(s.kind, s.share, dict(s.options)) for s in shipped.searchers] == \
        [(s.kind, s.share, dict(s.options)) for s in bench.searchers]
    assert (shipped.evaluation, shipped.space, shipped.constraints, shipped.task.name, shipped.promotion) == \
        (bench.evaluation, bench.space, bench.constraints, bench.task.name, bench.promotion)
    assert (shipped.study.n_trials, shipped.study.workers) == (bench.study.n_trials, bench.study.workers)


# -- the stall bound -------------------------------------------------------------------------
class Stuck(Searcher):
    """Waits forever for background work that never starts."""

    kind = "stuck"

    def __init__(self, context, options=None):
        super().__init__(context, options)
        self.since = time.monotonic()

    def ask(self, n):
        return []

    def tell(self, outcome):
        pass

    @property
    def waiting(self):
        return True

    def pending_since(self):
        return self.since


def test_background_work_that_never_starts_stops_the_run(monkeypatch):
    monkeypatch.setattr(search.driver, "STALL_S", 0.5)
    harness = Harness(tiny_space())
    stuck = Stuck(harness.context(label="stuck"))
    start = time.monotonic()
    with pytest.raises(SearcherStalled) as err:
        harness.run(stuck, 4, label="stuck")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("searcher 'stuck' (stuck): its Ray tasks (0 x 1 CPU) waited ")
    assert "give Ray more free CPUs" in message


def test_stall_bound_leaves_work_that_runs_alone():
    harness = Harness(tiny_space())
    stuck = Stuck(harness.context(label="stuck"))
    check_stalled({"stuck": stuck})          # just launched: within the bound
    stuck.since = time.monotonic() - search.driver.STALL_S - 1
    with pytest.raises(SearcherStalled):
        check_stalled({"stuck": stuck})
    stuck.since = None
    check_stalled({"stuck": stuck})          # nothing waits


class Slow(Searcher):
    """Background work that gives a proposal only after ``delay`` asks (a training run)."""

    kind = "slow"

    def __init__(self, context, delay: int):
        super().__init__(context)
        self.delay = delay
        self.asked = 0

    def ask(self, n):
        self.asked += 1
        if self.asked <= self.delay:
            return []
        self.asked = 0
        return [Proposal(self.space.uniform(0.5), meta={"slow": True})]

    def tell(self, outcome):
        pass

    @property
    def waiting(self):
        return True


def _drive(harness: Harness, searchers: dict, shares: dict, n_trials: int) -> collections.Counter:
    """Run the real driver loop over ``searchers`` with a fake pool until ``n_trials``."""
    pool = FakePool(harness.space, workers=2, window=2)
    bind_searchers(searchers, harness.recorder)
    budget = Budget(n_trials, 0, harness.storage, harness.recorder.study_id, harness.me)
    plan = Plan(searchers=searchers, shares=shares, directions=DIRECTIONS, constraint_names=harness.constraints.names,
                ordered=False, space=harness.space)
    run_loop(Driver(plan, pool, harness.recorder, budget, [], harness.me.run_id), collections.deque(), deadline=None)
    return collections.Counter(r.searcher for r in harness.records())


@pytest.mark.parametrize("delay", [2, 10])
def test_a_searcher_waiting_on_its_own_work_keeps_its_share(delay):
    harness = Harness(tiny_space())
    searchers = {"random": make_searcher("random", harness.context(label="random")),
                 "slow": Slow(harness.context(label="slow"), delay)}
    got = _drive(harness, searchers, {"random": 0.75, "slow": 0.25}, 12)
    assert got == {"random": 9, "slow": 3}


# -- through the command line, with default Ray ----------------------------------------------
@pytest.mark.parametrize("searchers, n_trials, wanted", [
    (MASKING.format(share="", parallel=2), 6, {"masking": 6}),
    (PORTFOLIO, 20, {"tpe": 8, "nsga2": 4, "genetic": 6, "masking": 2}),
], ids=["masking-only", "portfolio"])
def test_every_searcher_gets_its_share_through_prunesearch_run(tmp_path, searchers, n_trials, wanted):
    path = _config(tmp_path, searchers, n_trials)
    start = time.monotonic()
    done = _run_cli(f"""
        import sys
        from search.cli import main
        sys.exit(main(["run", {str(path)!r}, "--no-progress"]))
        """, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - start < 90
    got = _per_searcher(path)
    assert sum(got.values()) == n_trials
    # A searcher with background work (masking) keeps all of its share; the others get theirs
    # up to the GA's generation barriers, during which they fill in for each other.
    for name, share in wanted.items():
        assert got[name] >= (share if name == "masking" else share // 2), (name, dict(got))


def test_ray_without_room_for_a_searchers_tasks_is_refused_before_any_write(tmp_path):
    path = _config(tmp_path, MASKING.format(share="", parallel=1), 4)
    done = _run_cli(f"""
        import sys
        import ray
        from search.cli import main
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
        sys.exit(main(["run", {str(path)!r}, "--no-progress"]))
        """, timeout=90)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunesearch: error: "), done.stderr
    assert "searcher 'masking' runs Ray tasks of 1 CPU(s), but the evaluation workers (2 x 1 thread(s)) hold 2" \
        in lines[0]
    assert not Path(load_config(path).study.storage_url).exists()


def test_masking_run_pending_for_lack_of_cpus_is_reported_as_waiting():
    """A masking run whose Ray task cannot start reports since when it waits; once the CPU
    frees, it starts and the wait is over."""
    done = _run_cli("""
        import time
        import ray
        from search.base import SearcherContext, make_searcher
        from evaluators.settings import EvalSettings
        from tests.fakes import tiny_space, tiny_task

        ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)

        @ray.remote(num_cpus=1)
        class Hog:
            def ping(self):
                return 1

        hog = Hog.remote()
        ray.get(hog.ping.remote())
        context = SearcherContext(space=tiny_space(), objectives=("accuracy", "flops"),
                                  directions=("maximize", "minimize"), settings=EvalSettings(), task=tiny_task())
        masking = make_searcher("masking", context, {"steps": 2, "parallel": 1, "targets": [0.5]})
        assert masking.ask(1) == []
        time.sleep(2.0)
        since = masking.pending_since()
        assert since is not None and time.monotonic() - since >= 2.0, since
        ray.kill(hog)
        deadline = time.monotonic() + 60
        got = []
        while not got and time.monotonic() < deadline:
            got = masking.ask(1)
            time.sleep(0.2)
        assert len(got) == 1 and masking.pending_since() is None
        print("ok")
        """, timeout=90)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_a_stalled_searcher_stops_prunesearch_run_with_one_line_and_the_log(tmp_path):
    path = _config(tmp_path, '\n[[searchers]]\nkind = "stuck"\n', 4)
    start = time.monotonic()
    done = _run_cli(f"""
        import sys
        import search.driver
        from search.base import register_searcher
        from tests.test_resources import Stuck

        register_searcher("stuck")(Stuck)
        search.driver.STALL_S = 1.0
        from search.cli import main
        sys.exit(main(["run", {str(path)!r}, "--no-progress"]))
        """, timeout=90)
    assert done.returncode == 1, done.stderr[-2000:]
    assert time.monotonic() - start < 60
    lines = [line for line in done.stderr.splitlines() if line.startswith("prunesearch: error: ")]
    assert len(lines) == 1, done.stderr
    assert "run failed: SearcherStalled: searcher 'stuck' (stuck): its Ray tasks" in lines[0]
    assert f"(traceback in {tmp_path}/tiny.log)" in lines[0]
    assert "SearcherStalled" in (tmp_path / "tiny.log").read_text()
