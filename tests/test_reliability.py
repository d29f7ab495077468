"""Crashes and concurrency: nothing a search finished may be lost, nothing counted twice.

* a Ray worker SIGKILLed mid-study: the run still spends exactly its budget, the
  interrupted evaluation is retried on a new worker;
* a ``prunesearch run`` launcher SIGKILLed mid-study, then run again: exactly ``n_trials``
  COMPLETE, its RUNNING trials marked FAIL (``stale``) and proposed again, no policy
  evaluated twice;
* two launchers on one study at the same time (SQLite, journal file, PostgreSQL): exactly
  ``n_trials`` COMPLETE, unique trial numbers, no policy evaluated by both;
* in-process, with another launcher simulated in the storage: its RUNNING trials count
  towards the budget, one appearing mid-run cannot push the study over it, and a trial a
  launcher died with between ``study.ask`` and writing its attrs is failed on resume.

The launchers are real ``python -m search run`` processes (the resume after a crash runs
in-process through the same entry point); they join the test session's Ray instance
(``--ray-address``) instead of starting a Ray of their own each (that costs ~10 s per
launcher on 2 cores), which is also how launchers share a cluster.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.cli import main
from search.config import load_config
from search.runner import run_study
from search.setup import default_pool
from search.storage import close_storage, open_storage, parse_storage
from tests.fakes import tiny_config

optuna.logging.set_verbosity(optuna.logging.WARNING)

ROOT = Path(__file__).resolve().parents[1]
# A short fine-tune on the tiny task: long enough that a kill lands while work is in
# flight, short enough for a budget of 8.
SLOW_EVAL = '[evaluation]\nrecovery = "finetune"\nfinetune_steps = {steps}\n'


def random_and_ga(finetune_steps: int = 20) -> str:
    """A random searcher and a GA whose cheap step fine-tunes as long as the study does.

    The GA's default cheap step (adaptive BN alone) takes ~50 ms on the tiny task: a budget
    made mostly of its sensitivity pass would finish between two polls of a watch.
    """
    return f"""
[[searchers]]
kind = "random"
[[searchers]]
kind = "genetic"
[searchers.options]
population = 4
top_k = 1
cheap = {{ recovery = "finetune", finetune_steps = {finetune_steps} }}
"""


def study_config(tmp_path: Path, *, name: str = "tiny", n_trials: int = 8, storage: str | None = None,
                 searchers: str | None = None, workers: int = 1, finetune_steps: int = 20) -> Path:
    """The tiny-task study of tests.fakes with slower evaluations and a finer grid.

    The finer grid (17 levels x 4 groups x 2 methods) makes two independently seeded
    searchers practically never propose the same policy.
    """
    path = tiny_config(tmp_path, name=name, n_trials=n_trials, searchers=searchers)
    text = path.read_text()
    text = text.replace("[evaluation]\n", SLOW_EVAL.format(steps=finetune_steps)).replace("ratio_step = 0.1", 'ratio_step = 0.05\nmethods = ["l1", "l2"]')
    text = text.replace("seed = 0\n", f"seed = 0\nworkers = {workers}\nwindow = 2\n", 1)
    if storage is not None:
        text = text.replace(f'storage = "sqlite:///{tmp_path}/{name}.db"', f'storage = "{storage}"')
    path.write_text(text)
    return path


def barrier_task(barrier: str, parties: int = 2, timeout_s: float = 180.0, cache_dir: str | None = None):
    """Task plugin: tests.fakes' tiny task, handed out once ``parties`` launchers asked.

    Launchers started together then reach their search loops together, whatever their
    interpreter start-up took on a loaded machine, so each of them gets a share of the budget.
    """
    from tests.fakes import tiny_task

    folder = Path(barrier)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout_s
    while len(list(folder.iterdir())) < parties:
        if time.monotonic() > deadline:
            raise RuntimeError(f"barrier {barrier}: the other launcher(s) never arrived")
        time.sleep(0.05)
    return tiny_task()


def launcher(config: Path, address: str, *args: str) -> subprocess.Popen:
    """``prunesearch run CONFIG`` in its own process group, joining Ray at ``address``."""
    cmd = [sys.executable, "-m", "search", "run", str(config), "--no-progress", "--ray-address", address, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240.0) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"launcher did not finish in {timeout} s:\n{err[-3000:]}")
    assert proc.returncode == 0, f"launcher exited {proc.returncode}:\n{err[-3000:]}"
    return out, err


class Watch:
    """One open handle on a study's storage, read while launchers write to it."""

    def __init__(self, url: str, name: str) -> None:
        self.storage = open_storage(parse_storage(url))
        self.name = name

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        try:
            return optuna.load_study(study_name=self.name, storage=self.storage).get_trials(deepcopy=False)
        except KeyError:  # the launcher has not created the study yet
            return []

    def wait(self, until, timeout: float, proc: subprocess.Popen | None = None) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            trials = self.trials()
            if until(trials):
                return trials
            if proc is not None and proc.poll() is not None:
                pytest.fail(f"launcher exited {proc.returncode} early:\n{proc.stderr.read()[-3000:]}")
            time.sleep(0.1)
        pytest.fail(f"condition not reached in {timeout} s; states {collections.Counter(t.state.name for t in trials)}")

    def close(self) -> None:
        close_storage(self.storage)


def evaluation_key(t: optuna.trial.FrozenTrial) -> tuple[str, str]:
    return (t.user_attrs["policy"], t.user_attrs["fidelity"])


def evaluated(trials) -> list:
    """COMPLETE trials whose metrics came from an evaluation (not from the result cache)."""
    return [t for t in trials if t.state == TrialState.COMPLETE and "cached_from" not in t.user_attrs["metrics"]]


def complete(trials) -> int:
    return sum(t.state == TrialState.COMPLETE for t in trials)


@pytest.fixture(scope="module")
def ray_address(ray_session):
    return ray_session.get_runtime_context().gcs_address


# -- a Ray worker dies ---------------------------------------------------------------------
def test_sigkilled_worker_mid_study_is_replaced_and_its_trial_retried(tmp_path, ray_session):
    """SIGKILL the Ray worker running an evaluation; the study still ends with its budget."""
    import ray

    n = 8
    config = load_config(study_config(tmp_path, n_trials=n, workers=2, searchers=random_and_ga(), storage=None))
    seen = {"tags": []}

    class KillOnce:
        """The real EvaluatorPool; after its first result, SIGKILL a worker mid-evaluation."""

        def __init__(self, pool):
            self.pool = pool

        def __getattr__(self, name):
            return getattr(self.pool, name)

        def results(self, timeout=None):
            out = self.pool.results(timeout)
            seen["tags"] += [tag for tag, _, _ in out]
            if out and "victim" not in seen:
                for slot, pid in zip(self.pool._slots, self.pool.worker_pids()):
                    head = slot.jobs[0] if slot.jobs else None  # the job its actor is running
                    if head is None:
                        continue
                    # Freeze the worker, let a reply already on its way land, and kill it only
                    # if its evaluation is still unfinished: then it surely dies mid-evaluation.
                    os.kill(pid, signal.SIGSTOP)
                    time.sleep(0.3)
                    if ray.wait([head.ref], timeout=0)[0]:
                        os.kill(pid, signal.SIGCONT)
                        continue
                    os.kill(pid, signal.SIGKILL)
                    seen.update(victim=pid, job=head, restarts=self.pool.restarts)
                    break
            return out

        def close(self):
            seen.update(pids_after=self.pool.worker_pids(), restarts_after=self.pool.restarts)
            self.pool.close()

    summary = run_study(config, pool_factory=lambda p, a: KillOnce(default_pool(p, a)), progress=False)

    assert "victim" in seen, "no evaluation was in flight to interrupt"  # (then raise finetune_steps)
    trials = summary.records
    assert [r.number for r in trials] == list(range(n))                  # none lost, none extra
    assert all(r.state == TrialState.COMPLETE and r.metrics.error is None for r in trials)
    assert summary.finished == n and summary.stale_failed == 0
    interrupted = seen["job"]
    assert interrupted.retries == 1                                       # it died with its worker...
    assert trials[interrupted.tag].state == TrialState.COMPLETE           # ...and was evaluated again
    assert seen["restarts_after"] == seen["restarts"] + 1 and seen["victim"] not in seen["pids_after"]
    assert len(seen["tags"]) == len(set(seen["tags"])) == summary.evaluations  # each result once
    assert summary.evaluations + summary.cached == n


# -- the launcher dies ---------------------------------------------------------------------
@pytest.mark.slow
def test_sigkilled_launcher_resumes_to_exactly_n_trials(tmp_path, ray_address, capsys):
    n = 8
    # ~0.7 s an evaluation here, so the kill after the third result lands with seconds of
    # the budget left (at 20 steps the last five results came within 0.2-0.4 s: CI once
    # saw all eight at its first poll after the third)
    steps = 200
    path = study_config(tmp_path, n_trials=n, searchers=random_and_ga(steps), finetune_steps=steps)
    config = load_config(path)
    watch = Watch(config.study.storage_url, config.name)
    try:
        proc = launcher(path, ray_address)
        at_kill = watch.wait(lambda ts: complete(ts) >= 3, timeout=180, proc=proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        first = watch.trials()
        running = {t.number for t in first if t.state == TrialState.RUNNING}
        done_first = {t.number: (t.values, evaluation_key(t)) for t in first if t.state == TrialState.COMPLETE}
        assert complete(at_kill) >= 3 and len(done_first) < n
        assert running, "the launcher was killed with nothing in flight"

        # run it again (in this process: same entry point, no second interpreter start-up)
        assert main(["run", str(path), "--no-progress", "--ray-address", ray_address]) == 0
        out = capsys.readouterr().out
        trials = watch.trials()
    finally:
        watch.close()

    assert f"{len(running)} stale failed" in out
    assert complete(trials) == n                                           # exactly the budget
    assert [t.number for t in trials] == list(range(len(trials)))           # numbers unique, no gap
    stale = {t.number for t in trials if t.user_attrs.get("stale")}
    assert stale == running                                                # heartbeat equivalent
    assert all(t.state == TrialState.FAIL for t in trials if t.number in stale)
    assert all(t.state == TrialState.COMPLETE for t in trials if t.number not in stale)
    # nothing finished before the crash was lost or changed
    for number, (values, key) in done_first.items():
        assert (trials[number].values, evaluation_key(trials[number])) == (values, key)
    # no policy evaluated twice; the interrupted ones were evaluated again, by the new run
    keys = [evaluation_key(t) for t in evaluated(trials)]
    assert len(keys) == len(set(keys))
    # (a trial killed between an Optuna searcher's ask and its attrs has no policy to re-propose)
    later = {evaluation_key(t) for t in trials if t.number > max(t2.number for t2 in first)}
    assert {evaluation_key(trials[s]) for s in stale if "policy" in trials[s].user_attrs} <= later


# -- two launchers at once -----------------------------------------------------------------
@pytest.fixture(params=["sqlite", "journal", "postgresql"])
def shared_storage(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/shared.db"
    elif request.param == "journal":
        yield f"{tmp_path}/shared.journal"
    else:
        from tests.postgres import postgres_url_or_skip

        with postgres_url_or_skip() as url:
            yield url


@pytest.mark.slow
def test_two_launchers_at_once_share_the_budget(tmp_path, ray_address, shared_storage):
    n = 8
    random_only = '\n[[searchers]]\nkind = "random"\n'
    path = study_config(tmp_path, n_trials=n, storage=shared_storage, searchers=random_only)
    path.write_text(path.read_text().replace(
        'name = "tests.fakes:tiny_task"',
        f'name = "tests.test_reliability:barrier_task"\n[task.options]\nbarrier = "{tmp_path}/barrier"'))
    config = load_config(path)
    procs = [launcher(path, ray_address) for _ in range(2)]
    outs = [finish(p)[0] for p in procs]
    watch = Watch(shared_storage, config.name)
    try:
        trials = watch.trials()
    finally:
        watch.close()

    assert complete(trials) == n, collections.Counter(t.state.name for t in trials)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == len(trials)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    # anything beyond the budget is a trial taken back, never an evaluation
    extra = [t for t in trials if t.state != TrialState.COMPLETE]
    assert all(t.state == TrialState.FAIL and t.user_attrs.get("over_budget") for t in extra)
    runs = collections.Counter(t.user_attrs["run"] for t in trials if t.state == TrialState.COMPLETE)
    assert len(runs) == 2, f"one launcher did all the work ({dict(runs)}): they did not overlap"
    # each launcher's searchers got their own seeds: no policy evaluated by both
    keys = [evaluation_key(t) for t in evaluated(trials)]
    assert len(keys) == len(set(keys))
    for out in outs:
        assert out.startswith(f"study {config.name}: ")


# -- the shared budget, in-process (another launcher simulated in the storage) ---------------
class OtherLauncher:
    """A live launcher on this host (our parent process) holding RUNNING trials of its own."""

    def __init__(self, config) -> None:
        from search.setup import load_task_and_space
        from search.launchers import Launcher, write_heartbeat
        from search.recorder import TrialRecorder

        self.storage = open_storage(parse_storage(config.study.storage_url))
        me = Launcher("0ddba11", socket.gethostname(), os.getppid(), time.time())
        study_id = self.storage.get_study_id_from_name(config.name)
        write_heartbeat(self.storage, study_id, me)
        _, self.space = load_task_and_space(config)
        self.recorder = TrialRecorder(self.storage, config.name, space=self.space, settings=config.evaluation,
                                      objectives=config.study.objectives, constraints=config.constraints,
                                      run_id=me.run_id)
        self.trials = []

    def start(self, k: int, seed: int = 123) -> None:
        import numpy as np

        from search.base import Proposal

        rng = np.random.default_rng(seed)
        for _ in range(k):
            proposal = Proposal(self.space.sample(rng))
            self.trials.append((self.recorder.open("other", proposal), proposal))

    def finish(self) -> None:
        from tests.fakes import synthetic_metrics

        for trial, proposal in self.trials:
            self.recorder.finish(trial, proposal, synthetic_metrics(self.space, proposal.policy))
        close_storage(self.storage)


def states(config) -> collections.Counter:
    handle = open_storage(parse_storage(config.study.storage_url))
    try:
        trials = optuna.load_study(study_name=config.name, storage=handle).get_trials()
    finally:
        close_storage(handle)
    return collections.Counter((t.state.name, t.user_attrs.get("run") == "0ddba11",
                                bool(t.user_attrs.get("over_budget"))) for t in trials)


def test_running_trials_of_a_live_launcher_count_towards_the_budget(tmp_path):
    from tests.fakes import FakePool

    config = load_config(study_config(tmp_path, n_trials=6, searchers='\n[[searchers]]\nkind = "random"\n'))
    run_study(config.with_overrides(n_trials=2), pool_factory=lambda p, a: FakePool(p.space), progress=False)
    other = OtherLauncher(config)
    other.start(2)
    summary = run_study(config, pool_factory=lambda p, a: FakePool(p.space), progress=False)
    assert summary.new_trials == 2 and summary.stale_failed == 0   # 2 done + 2 of the other's + 2 new
    assert states(config) == {("COMPLETE", False, False): 4, ("RUNNING", True, False): 2}
    other.finish()
    assert states(config) == {("COMPLETE", False, False): 4, ("COMPLETE", True, False): 2}


def test_a_launcher_appearing_mid_run_cannot_push_the_study_over_budget(tmp_path, monkeypatch):
    """The check after creating a trial keeps the count exact even when the check before
    (a read of the launcher table, at most every OTHERS_RECHECK_S) missed a new launcher."""
    import search.budget
    from tests.fakes import FakePool

    monkeypatch.setattr(search.budget, "OTHERS_RECHECK_S", 1e9)  # this run never notices it in time
    n = 8
    config = load_config(study_config(tmp_path, n_trials=n, searchers='\n[[searchers]]\nkind = "random"\n'))
    run_study(config.with_overrides(n_trials=1), pool_factory=lambda p, a: FakePool(p.space), progress=False)
    other = None

    class Appearing(FakePool):
        def results(self, timeout=None):
            nonlocal other
            if self.returned == 2 and other is None:
                # 3 COMPLETE + our 2 RUNNING so far: the other takes 2 of the 3 places left
                other = OtherLauncher(config)
                other.start(2)
            return super().results(timeout)

    summary = run_study(config, pool_factory=lambda p, a: Appearing(p.space), progress=False)
    assert other is not None and summary.stale_failed == 0
    counts = states(config)
    # exactly n_trials places: ours COMPLETE + the other's RUNNING; the trial this run
    # created after the last place was gone is taken back (FAIL, over_budget), not evaluated
    assert counts[("COMPLETE", False, False)] + counts[("RUNNING", True, False)] == n
    assert counts[("RUNNING", True, False)] == 2
    assert counts[("FAIL", False, True)] == 1 and sum(counts.values()) == n + 1
    other.finish()


def test_a_trial_left_between_ask_and_its_attrs_is_failed_on_resume(tmp_path):
    """An Optuna searcher's ``study.ask`` creates the trial before the runner records whose
    it is; a launcher killed in between leaves a RUNNING trial with no launcher id."""
    from tests.fakes import FakePool

    config = load_config(study_config(tmp_path, n_trials=4, searchers='\n[[searchers]]\nkind = "random"\n'))
    run_study(config.with_overrides(n_trials=2), pool_factory=lambda p, a: FakePool(p.space), progress=False)
    handle = open_storage(parse_storage(config.study.storage_url))
    orphan = optuna.load_study(study_name=config.name, storage=handle).ask().number
    close_storage(handle)
    summary = run_study(config, pool_factory=lambda p, a: FakePool(p.space), progress=False)
    assert summary.stale_failed == 1 and summary.finished == 4
    record = summary.records[orphan]
    assert record.state == TrialState.FAIL and record.stale
    assert sum(r.state == TrialState.COMPLETE for r in summary.records) == 4
