"""Bad input, case by case: exit code 2, one line naming the problem, storage untouched.

Every case runs the ``prunesearch`` entry point in-process against a study that already
exists (with a watermark), so "untouched" means something: the SQLite file is
byte-identical afterwards and no side file (-wal, -shm) appeared. Cases cover the command
line, the TOML file, task plugins, storage URLs, export directories and watermark key files.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from search.cli import main
from search.config import load_config
from search.runner import run_study
from tests.fakes import FakePool, tiny_config

KEY = b"bad-input-test-key-0123456789abcdef"


@dataclass(frozen=True)
class Case:
    name: str
    fragment: str                      # what the one error line must say
    # {config}: the case's config file, {tmp}: the case's own folder, {shared}: the study's
    argv: tuple[str, ...] = ("run", "{config}")
    old: str = ""                      # config edit: old ({tmp}: the study's folder) -> new
    new: str = ""
    files: dict[str, str | None] = field(default_factory=dict)  # name -> text (None: a directory)
    xfail: str = ""                    # a known bug in a file this suite does not own


CASES = [
    # -- command line ---------------------------------------------------------------------
    Case("cli-unknown-option", "unrecognized arguments: --frobnicate", ("run", "{config}", "--frobnicate")),
    Case("cli-workers-zero", "workers must be >= 1, got 0", ("run", "{config}", "--workers", "0")),
    Case("cli-timeout-not-a-number", "expected a number, got 'soon'", ("run", "{config}", "--timeout", "soon")),
    Case("cli-n-trials-not-an-integer", "expected an integer, got '1.5'", ("run", "{config}", "--n-trials", "1.5")),
    Case("cli-missing-config", "required: config", ("run",)),
    Case("cli-unknown-command", "invalid choice: 'frobnicate'", ("frobnicate",)),
    Case("cli-unknown-export-format", "unknown export format 'tflite'", ("export", "{config}", "--formats", "tflite")),
    Case("cli-negative-finetune", "finetune_steps must be an integer >= 0", ("export", "{config}", "--finetune-steps", "-1")),
    Case("cli-port-not-an-integer", "expected an integer, got 'http'", ("dashboard", "{config}", "--port", "http")),
    Case("cli-port-out-of-range", "--port 70000 is not a TCP port", ("dashboard", "{config}", "--port", "70000")),
    Case("cli-allow-changed-constraints-with-value", "ignored explicit argument 'yes'",
         ("run", "{config}", "--allow-changed-constraints=yes")),
    Case("cli-allow-changed-constraints-on-status", "unrecognized arguments: --allow-changed-constraints",
         ("status", "{config}", "--allow-changed-constraints")),
    Case("cli-changed-constraint", "max_flops_ratio 0.7 -> 0.9", old="max_flops_ratio = 0.7", new="max_flops_ratio = 0.9"),
    Case("cli-changed-constraint-on-export", "--allow-changed-constraints` first", ("export", "{config}"),
         old="max_flops_ratio = 0.7", new="max_flops_ratio = 0.9"),
    Case("cli-describe-missing-config", "required: config", ("describe",)),
    Case("cli-describe-json-with-value", "ignored explicit argument 'yes'", ("describe", "{config}", "--json=yes")),
    Case("cli-describe-missing-file", "not found", ("describe", "{tmp}/nope.toml")),
    # -- TOML ---------------------------------------------------------------------------
    Case("toml-duplicate-key", "invalid TOML", old="seed = 0", new="seed = 0\nseed = 1"),
    Case("toml-wrong-type", "n_trials must be an integer, got 'six'", old="n_trials = 6", new='n_trials = "six"'),
    Case("toml-name-is-a-path", "[study] name '../escape'", old='name = "tiny"', new='name = "../escape"'),
    Case("toml-ratio-above-one", "max_flops_ratio is a ratio in (0, 1], got 1.5", old="max_flops_ratio = 0.7",
         new="max_flops_ratio = 1.5"),
    Case("toml-share-zero", "share of 'random' must be > 0", old='kind = "random"', new='kind = "random"\nshare = 0'),
    Case("toml-unknown-recovery", "unknown recovery 'magic'", old="[evaluation]\n", new='[evaluation]\nrecovery = "magic"\n'),
    Case("toml-unknown-method", "unknown method 'nonsense'", old="ratio_step = 0.1", new='ratio_step = 0.1\nmethods = ["nonsense"]'),
    Case("toml-searchers-not-an-array", "must be an array of tables", old="[[searchers]]", new="[searchers]"),
    # -- task plugins -----------------------------------------------------------------------
    Case("plugin-missing-module", "cannot import module 'no_such_pkg.tasks'", old="tests.fakes:tiny_task",
         new="no_such_pkg.tasks:make"),
    Case("plugin-missing-attribute", "has no attribute 'no_such_task'", old="tests.fakes:tiny_task",
         new="tests.fakes:no_such_task"),
    Case("plugin-not-callable", "'DIRECTIONS' is a tuple, not a callable", old="tests.fakes:tiny_task",
         new="tests.fakes:DIRECTIONS"),
    Case("image-folder-num-workers-negative", "image-folder option num_workers must be an integer >= 0, got -1",
         old='name = "tests.fakes:tiny_task"', new='name = "image-folder"\noptions = {path = "{tmp}/img", '
         'model = "tests.test_tasks:TinyConvNet", num_workers = -1}'),
    Case("image-folder-num-workers-not-an-integer", "image-folder option num_workers must be an integer >= 0, got 'two'",
         old='name = "tests.fakes:tiny_task"', new='name = "image-folder"\noptions = {path = "{tmp}/img", '
         'model = "tests.test_tasks:TinyConvNet", num_workers = "two"}'),
    Case("plugin-bad-options", "does not accept options ['colour']", old="[space]", new='[task.options]\ncolour = "red"\n[space]'),
    Case("plugin-not-a-task", "returned SearchSpace, not an evaluators.tasks.Task", old="tests.fakes:tiny_task",
         new="tests.fakes:tiny_space"),
    Case("plugin-import-raises", "cannot import module 'broken_plugin_for_tests'", old="tests.fakes:tiny_task",
         new="broken_plugin_for_tests:make", files={"plugins/broken_plugin_for_tests.py": "raise RuntimeError('boom')\n"}),
    Case("plugin-metrics-not-measured", "name 'accuracy', but task 'tests.metric_tasks:regression_task' measures mae",
         old="tests.fakes:tiny_task", new="tests.metric_tasks:regression_task"),
    Case("plugin-metrics-declared-otherwise", "scores by {'accuracy': 'maximize'} but declares {'mae': 'minimize'}",
         old="tests.fakes:tiny_task", new="tests.metric_tasks:undeclared_accuracy_task"),
    Case("plugin-metrics-bad-declaration", "metric name 'MAE' must be lower-case", old="tests.fakes:tiny_task",
         new="tests.metric_tasks:badly_declared_task"),
    Case("plugin-metric-named-like-a-cost", "'flops' has the name of a built-in cost objective",
         old="tests.fakes:tiny_task", new="tests.metric_tasks:cost_named_task"),
    Case("space-head-ratio-keeps-no-head", "ratio_min 0.2 keeps no head of group 'blocks.1.fc2'",
         old="tests.fakes:tiny_task", new="tests.attention_models:tiny_attention_task"),
    # -- task metrics as objectives and constraints -------------------------------------------
    Case("toml-unknown-task-metric-objective", "unknown objective 'wer'", old="[task]",
         new='objectives = ["wer", "flops"]\n[task]'),
    Case("toml-task-metric-bound-wrong-direction", "unknown key 'max_accuracy' in [constraints]",
         old="max_flops_ratio = 0.7", new="max_flops_ratio = 0.7\nmax_accuracy = 0.5"),
    Case("toml-task-metric-bound-not-a-number", "[constraints] max_mae must be a finite number, got 'low'",
         old="max_flops_ratio = 0.7", new='max_flops_ratio = 0.7\nmax_mae = "low"'),
    # -- storage URLs -------------------------------------------------------------------------
    Case("storage-unknown-dialect", "unknown database dialect 'nosuchdb'", ("run", "{config}", "--storage", "nosuchdb://u@h/db")),
    Case("storage-missing-driver", "needs the database driver", ("run", "{config}", "--storage", "mysql://u@localhost/db")),
    Case("storage-in-memory", "in-memory", ("run", "{config}", "--storage", "sqlite:///:memory:")),
    Case("storage-sqlite-with-host", "SQLite URLs have no host", ("run", "{config}", "--storage", "sqlite://host/x.db")),
    Case("storage-not-a-journal-path", "nor a path ending in .journal", ("run", "{config}", "--storage", "{tmp}/study.txt")),
    Case("storage-not-sqlite", "is not an Optuna study storage", ("run", "{config}", "--storage", "sqlite:///{tmp}/notes.db"),
         files={"notes.db": "not a database\n"}),
    Case("storage-foreign-sqlite", "is not an Optuna study storage",
         ("status", "{config}", "--storage", "sqlite:///{shared}/app.db")),
    # -- export directories -------------------------------------------------------------------
    Case("export-out-is-a-file", "exists and is not a directory", ("export", "{config}", "--out", "{tmp}/out.txt"),
         files={"out.txt": "x"}),
    Case("export-out-not-an-export", "is not a prunesearch export", ("export", "{config}", "--out", "{tmp}/mine"),
         files={"mine/notes.txt": "mine"}),
    Case("export-out-under-a-file", "out.txt", ("export", "{config}", "--out", "{tmp}/out.txt/sub"), files={"out.txt": "x"}),
    # -- watermark key files ------------------------------------------------------------------
    Case("key-missing", "does not exist", old="{tmp}/owner.key", new="{tmp}/missing.key"),
    Case("key-empty", "is empty", old="{tmp}/owner.key", new="{tmp}/empty.key", files={"empty.key": "\n"}),
    Case("key-is-a-directory", "is not a regular file", old="{tmp}/owner.key", new="{tmp}/keys", files={"keys": None}),
    Case("key-inline-in-toml", "unknown [watermark] key(s): key", old='key_file = "{tmp}/owner.key"', new='key = "hunter2"'),
    Case("key-missing-on-verify", "does not exist", ("verify", "{config}", "{tmp}/empty-dir"), old="{tmp}/owner.key",
         new="{tmp}/missing.key", files={"empty-dir": None}),
    Case("watermark-unknown-allocation", "unknown watermark allocation 'magic'", old='message = "(c) tests"',
         new='message = "(c) tests"\nallocation = "magic"'),
    Case("watermark-unknown-projection", "unknown watermark projection 'magic'", old='message = "(c) tests"',
         new='message = "(c) tests"\nprojection = "magic"'),
    # -- latency table settings ---------------------------------------------------------------
    Case("latency-unknown-predictor", "latency predictor must be one of fitted, additive, got 'magic'",
         old="[evaluation]\n", new='[latency]\npredictor = "magic"\n[evaluation]\n'),
    Case("latency-negative-calibration", "latency calibration must be an integer >= 0, got -1",
         old="[evaluation]\n", new="[latency]\ncalibration = -1\n[evaluation]\n"),
    Case("latency-batch-moved", "latency_batch is now [latency] batch", old="[evaluation]\n",
         new="[evaluation]\nlatency_batch = 8\n"),
    Case("latency-runs-moved", "latency_runs is now [latency] runs", old="[evaluation]\n",
         new="[evaluation]\nlatency_runs = 5\n"),
    Case("latency-zero-runs", "latency runs must be an integer >= 1, got 0",
         old="[evaluation]\n", new="[latency]\nruns = 0\n[evaluation]\n"),
    Case("latency-ratio-objective-unmeasured", "neither [latency] table nor [evaluation] measure_latency is true",
         old="[task]", new='objectives = ["accuracy", "latency_ratio"]\n[latency]\ntable = false\n[task]'),
    # -- searcher options ---------------------------------------------------------------------
    Case("searcher-negative-uniform-start", "uniform_start must be an integer >= 0, got -2",
         old='kind = "random"', new='kind = "tpe"\n[searchers.options]\nuniform_start = -2'),
    Case("searcher-heuristic-start-unknown", "heuristic_start: unknown heuristic 'global_l1' (known: global_lamp",
         old='kind = "random"', new='kind = "tpe"\n[searchers.options]\nheuristic_start = {global_l1 = 4}'),
    Case("searcher-heuristic-start-zero", "nsga2 option heuristic_start.global_lamp must be an integer >= 1, got 0",
         old='kind = "random"', new='kind = "nsga2"\n[searchers.options]\nheuristic_start = {global_lamp = 0}'),
    Case("searcher-heuristic-start-not-a-table", "genetic option heuristic_start must be a table of heuristic name",
         old='kind = "random"', new='kind = "genetic"\n[searchers.options]\nheuristic_start = ["global_lamp"]'),
    Case("masking-all-targets-not-a-bool", "all_targets must be true or false, got 'yes'",
         old='kind = "random"', new='kind = "masking"\n[searchers.options]\nall_targets = "yes"'),
    # -- devices and GPUs -----------------------------------------------------------------
    Case("device-unknown-name", "device must be one of 'auto', 'cpu', 'cuda', 'cuda:N', got 'gpu'",
         old="[evaluation]\n", new='[evaluation]\ndevice = "gpu"\n'),
    Case("device-bad-index", "device must be one of 'auto', 'cpu', 'cuda', 'cuda:N', got 'cuda:-1'",
         old="[evaluation]\n", new='[evaluation]\ndevice = "cuda:-1"\n'),
    Case("device-index-not-here", "device 'cuda:9999'", old="[evaluation]\n", new='[evaluation]\ndevice = "cuda:9999"\n'),
    *([Case("device-cuda-without-cuda", "device 'cuda' asks for CUDA, but CUDA is not available here",
            old="[evaluation]\n", new='[evaluation]\ndevice = "cuda"\n'),
       Case("export-device-cuda-without-cuda", "device 'cuda' asks for CUDA, but CUDA is not available here",
            ("export", "{config}", "--out", "{tmp}/out"), old="[evaluation]\n", new='[evaluation]\ndevice = "cuda"\n'),
       ] if not torch.cuda.is_available() else []),
    # -- multi-fidelity promotion -------------------------------------------------------------
    Case("promotion-zero-steps", "[promotion]: steps must be an integer >= 1", old="[space]", new="[promotion]\nsteps = [0]\n[space]"),
    Case("promotion-unknown-recovery", "[promotion] recovery: unknown recovery 'magic'", old="[space]",
         new='[promotion]\nsteps = [20]\nrecovery = "magic"\n[space]'),
    Case("promotion-eta-one", "eta must be > 1", old="[space]", new="[promotion]\nsteps = [20]\neta = 1\n[space]"),
    Case("promotion-eval-samples-zero", "eval_samples must be an integer >= 1", old="[space]",
         new="[promotion]\nsteps = [20]\neval_samples = 0\n[space]"),
    Case("promotion-repeats-zero", "repeats must be an integer >= 1", old="[space]",
         new="[promotion]\nsteps = [20]\nrepeats = 0\n[space]"),
    # -- budget fill -------------------------------------------------------------------------
    Case("fill-level-out-of-range", "[fill]: levels must be FLOPs ratios in (0, 1], got 1.5", old="[space]",
         new="[fill]\nlevels = [1.5]\n[space]"),
    Case("fill-levels-not-increasing", "levels must be strictly increasing, got [0.5, 0.3]", old="[space]",
         new="[fill]\nlevels = [0.5, 0.3]\n[space]"),
    Case("fill-level-above-constraint", "[fill] level 0.9 is above [constraints] max_flops_ratio 0.7", old="[space]",
         new="[fill]\nlevels = [0.9]\n[space]"),
    Case("fill-unknown-key", "unknown key 'level' in [fill] (known: levels)", old="[space]", new="[fill]\nlevel = [0.5]\n[space]"),
    Case("fill-with-watermark", "[fill] and [watermark] cannot be combined", old="[space]",
         new="[fill]\nlevels = [0.5]\n[space]"),
    Case("gpus-per-worker-negative", "[study] gpus_per_worker must be >= 0.0, got -1", old="n_trials = 6",
         new="n_trials = 6\ngpus_per_worker = -1"),
    Case("gpus-per-worker-fraction-above-one", "gpus_per_worker must be a fraction below 1 or a whole number, got 1.5",
         old="n_trials = 6", new="n_trials = 6\ngpus_per_worker = 1.5"),
    Case("gpus-per-worker-not-a-number", "gpus_per_worker must be a finite number, got 'half'", old="n_trials = 6",
         new='n_trials = 6\ngpus_per_worker = "half"'),
    Case("verify-missing-export-dir", "not found", ("verify", "{config}", "{tmp}/no-such-export")),
    Case("verify-not-an-export", "{tmp}/empty-dir", ("verify", "{config}", "{tmp}/empty-dir"), files={"empty-dir": None}),
]


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """A finished 6-trial study with a watermark: what every case must leave untouched."""
    tmp = tmp_path_factory.mktemp("bad-input")
    (tmp / "owner.key").write_bytes(KEY)
    path = tiny_config(tmp, n_trials=6)
    path.write_text(path.read_text() + f'\n[watermark]\nkey_file = "{tmp}/owner.key"\nmessage = "(c) tests"\n')
    run_study(load_config(path), pool_factory=lambda p, a: FakePool(p.space), progress=False)
    foreign = sqlite3.connect(tmp / "app.db")  # some other program's database
    foreign.execute("CREATE TABLE notes (text TEXT)")
    foreign.commit()
    foreign.close()
    return tmp, path


def _storage_state(tmp: Path) -> dict[str, str | None]:
    return {name: _digest(tmp / name) for name in ("tiny.db", "tiny.db-wal", "tiny.db-shm", "app.db", "notes.db")}


def test_the_matrix_is_wide_enough():
    kinds = {c.name.split("-")[0] for c in CASES}
    assert len(CASES) >= 20 and {"cli", "toml", "plugin", "storage", "export", "key"} <= kinds


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)]
                                               if c.xfail else []) for c in CASES])
def test_bad_input_exits_2_with_one_line_and_storage_untouched(existing, case, capsys, monkeypatch):
    tmp, base = existing
    work = tmp / case.name
    work.mkdir(exist_ok=True)
    for name, text in case.files.items():
        target = work / name
        if text is None:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    if any(name.startswith("plugins/") for name in case.files):
        monkeypatch.syspath_prepend(str(work / "plugins"))
    # files a case creates live in its own folder; the study and its key in the shared one
    sub = {"{tmp}": str(work), "{shared}": str(tmp)}
    text = base.read_text()
    if case.old:
        old, new = case.old.replace("{tmp}", str(tmp)), case.new.replace("{tmp}", str(work))
        assert old in text, f"case {case.name}: {old!r} not in the config"
        text = text.replace(old, new)
    config = work / "study.toml"
    config.write_text(text)
    sub["{config}"] = str(config)
    argv = list(case.argv)
    for placeholder, value in sub.items():
        argv = [arg.replace(placeholder, value) for arg in argv]
    if argv and argv[0] == "run":
        argv.append("--no-progress")
    before = _storage_state(tmp) | _storage_state(work)

    rc = main(argv)

    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("prunesearch: error: "), err
    assert case.fragment.replace("{tmp}", str(work)) in lines[0], lines[0]
    assert out == ""
    assert _storage_state(tmp) | _storage_state(work) == before  # byte-identical, no new side files
