"""StudyConfig: TOML -> frozen, validated dataclasses; every problem one ConfigError line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from evaluators.metrics import Metrics
from search.config import ConfigError, ConstraintsSection, StudyConfig, load_config
from search.storage import parse_storage

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = {
    "study": {"name": "s", "n_trials": 4},
    "task": {"name": "digits"},
    "searchers": [{"kind": "random"}],
}


def with_(path: tuple[str, ...], value, base=MINIMAL):
    import copy

    data = copy.deepcopy(base)
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {}) if not isinstance(node, list) else node[int(key)]
    if isinstance(node, list):
        node[int(path[-1])] = value
    else:
        node[path[-1]] = value
    return data


def test_quickstart_config_is_valid():
    config = load_config(ROOT / "studies" / "quickstart.toml")
    assert config.name == "quickstart"
    assert config.study.storage_url == "sqlite:///studies/quickstart.db"
    assert config.study.directions == ("maximize", "minimize")
    assert {s.kind for s in config.searchers} >= {"tpe", "genetic"}
    assert abs(sum(config.shares.values()) - 1.0) < 1e-9
    assert config.constraints.names == ("max_flops_ratio",)
    assert config.evaluation.fidelity == "full"


def test_defaults_and_derived_values():
    config = StudyConfig.from_dict(MINIMAL)
    assert config.study.objectives == ("accuracy", "flops")
    assert config.study.log_path == Path("studies/logs/s.log")
    assert config.evaluation.seed == config.study.seed
    assert config.searchers[0].name == "random"
    assert config.export.formats == ("pt2",)


@pytest.mark.parametrize("path, value, match", [
    (("study", "bogus"), 1, r"unknown key 'bogus' in \[study\]"),
    (("task", "weights"), "x", r"unknown key 'weights' in \[task\]"),
    (("space", "ratio_mn"), 0.1, r"unknown key 'ratio_mn' in \[space\]"),
    (("constraints", "max_flops"), 0.5, r"unknown key 'max_flops' in \[constraints\]"),
    (("export", "format"), ["pt2"], r"unknown key 'format' in \[export\]"),
    (("evaluation", "finetune_step"), 3, r"\[evaluation\].*unknown evaluation setting.*finetune_step"),
    (("searchers", "0", "sharing"), 1, r"unknown key 'sharing' in \[searchers\]"),
    (("extra",), {}, r"unknown section \[extra\]"),
    (("study", "n_trials"), 0, r"n_trials must be > 0"),
    (("study", "n_trials"), -3, r"n_trials must be > 0"),
    (("study", "n_trials"), 2.5, r"n_trials must be an integer"),
    (("study", "name"), "a b/c", r"\[study\] name"),
    (("study", "objectives"), ["accuracy", "speed"], r"unknown objective 'speed'"),
    (("study", "objectives"), ["accuracy", "accuracy"], r"distinct"),
    (("latency", "threads"), 0, r"latency"),
    (("study", "workers"), 0, r"workers must be >= 1"),
    (("searchers", "0", "kind"), "annealing", r"unknown searcher 'annealing'"),
    (("searchers", "0", "share"), 0, r"share .* must be > 0"),
    (("searchers", "0", "options"), {"seed": 3}, r"unknown option\(s\) seed for searcher 'random'"),
    (("constraints", "max_flops_ratio"), 1.5, r"max_flops_ratio is a ratio"),
    (("export", "formats"), ["tflite"], r"unknown format 'tflite'"),
    (("evaluation", "recovery"), "magic", r"unknown recovery 'magic'"),
    (("evaluation", "fidelity"), "cheap", r"fidelity must stay 'full'"),
    (("space", "methods"), ["l1", "magic"], r"\[space\]: unknown method 'magic'"),
    (("space", "recoveries"), ["cap", "capp"], r"\[space\]: unknown recovery 'capp'"),
    (("space", "ratio_min"), 0.0, r"\[space\]: ratio range"),
    (("evaluation", "latency_batch"), 8, r"\[evaluation\].*latency_batch is now \[latency\] batch"),
    (("evaluation", "latency_runs"), 5, r"\[evaluation\].*latency_runs is now \[latency\] runs"),
    (("evaluation", "latency"), {"runs": 5}, r"\[evaluation\] latency: .*\[latency\] table"),
    (("latency", "rounds"), 5, r"unknown key 'rounds' in \[latency\]"),
])
def test_bad_values_are_one_line_config_errors(path, value, match):
    with pytest.raises(ConfigError, match=match) as info:
        StudyConfig.from_dict(with_(path, value))
    assert "\n" not in str(info.value)


def test_sections_are_the_configs_of_their_layers():
    from evaluators.latency_table import LatencyConfig
    from spaces.space import SpaceConfig

    config = StudyConfig.from_dict(with_(("latency",), {"batch": 4, "runs": 7}))
    assert isinstance(config.space, SpaceConfig) and config.space.ratio_min == 0.2
    assert config.latency == LatencyConfig(batch=4, runs=7)
    assert config.evaluation.latency is config.latency  # per-evaluation timing reads [latency]


def test_objectives_come_from_the_registry():
    from evaluators.metrics import MAXIMIZE, Objective, register_objective
    from search.config import CONSTRAINTS

    register_objective("accuracy", Objective(MAXIMIZE, "accuracy"))  # the same objective again: a no-op
    assert CONSTRAINTS["max_flops_ratio"] == "flops" and CONSTRAINTS["min_accuracy"] == "accuracy"
    config = StudyConfig.from_dict(with_(("study", "objectives"), ["accuracy", "params", "latency_ratio"]))
    assert config.study.directions == ("maximize", "minimize", "minimize")


def test_budget_is_required_and_duplicate_searcher_names_are_refused():
    data = with_(("study",), {"name": "s"})
    with pytest.raises(ConfigError, match="no budget"):
        StudyConfig.from_dict(data)
    data = with_(("searchers",), [{"kind": "tpe"}, {"kind": "tpe"}])
    with pytest.raises(ConfigError, match="used twice"):
        StudyConfig.from_dict(data)
    data = with_(("searchers",), [{"kind": "tpe"}, {"kind": "tpe", "name": "tpe2", "share": 3}])
    assert StudyConfig.from_dict(data).shares == {"tpe": 0.25, "tpe2": 0.75}


def test_missing_sections():
    for section in ("study", "task", "searchers"):
        data = {k: v for k, v in MINIMAL.items() if k != section}
        with pytest.raises(ConfigError, match="study|task|searchers"):
            StudyConfig.from_dict(data)


def test_load_config_reports_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[study\nname = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML") as info:
        load_config(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_overrides_are_validated_and_reseed_the_evaluation():
    config = StudyConfig.from_dict(MINIMAL)
    changed = config.with_overrides(n_trials=9, seed=7, storage="x.journal", timeout_s=None)
    assert changed.study.n_trials == 9 and changed.evaluation.seed == 7 and changed.study.storage_url == "x.journal"
    assert config.study.n_trials == 4  # frozen original untouched
    with pytest.raises(ConfigError, match="n_trials must be > 0"):
        config.with_overrides(n_trials=0)


def test_constraint_values_follow_optunas_convention():
    c = ConstraintsSection(max_flops_ratio=0.5, min_accuracy=0.9)
    assert c.names == ("max_flops_ratio", "min_accuracy")
    ok = Metrics(accuracy=0.95, flops_ratio=0.4)
    bad = Metrics(accuracy=0.85, flops_ratio=0.6)
    assert all(v <= 0 for v in c.values(ok))
    assert all(v > 0 for v in c.values(bad))
    assert c.values(bad) == pytest.approx((0.1, 0.05))
    assert all(v > 0 for v in ConstraintsSection(max_latency_ms=3.0).values(ok))  # not measured: infeasible


@pytest.mark.parametrize("url, kind", [
    ("sqlite:///studies/x.db", "sqlite"),
    ("sqlite:////abs/path/x.db", "sqlite"),
    ("studies/x.journal", "journal"),
])
def test_storage_urls(url, kind):
    assert parse_storage(url).kind == kind


@pytest.mark.parametrize("url, match", [
    ("not a url", "neither a database URL"),
    ("studies/x.db", "neither a database URL"),
    ("sqlite:/x.db", "neither a database URL"),
    ("postgresql://u@h:notaport/db", "malformed"),
    ("mysql://u@h/db", "needs the database driver"),
    ("foo://host/db", "unknown database dialect"),
    ("sqlite://", "not an SQLite file"),
    ("sqlite:///:memory:", "not an SQLite file"),
])
def test_malformed_storage_urls(url, match):
    if url.startswith("mysql") and importlib.util.find_spec("MySQLdb") is not None:
        pytest.skip("the MySQL driver is installed here")
    with pytest.raises(ConfigError, match=match):
        parse_storage(url)


def test_the_study_readme_names_every_key_of_every_section():
    """studies/README.md's section table lists each section's keys: a key a config accepts
    but the table leaves out is a key users cannot find."""
    from dataclasses import fields

    from evaluators.latency_table import LatencyConfig
    from evaluators.settings import EvalSettings
    from search.config import _SECTIONS, ExportSection, SearcherSection, StudySection, TaskSection
    from search.promotion import PromotionConfig
    from spaces.fill import FillConfig
    from spaces.space import SpaceConfig
    from spaces.watermark import WatermarkConfig

    classes = {"study": StudySection, "task": TaskSection, "space": SpaceConfig, "evaluation": EvalSettings,
               "constraints": ConstraintsSection, "searchers": SearcherSection, "export": ExportSection,
               "watermark": WatermarkConfig, "latency": LatencyConfig, "promotion": PromotionConfig,
               "fill": FillConfig}
    # not keys of the table: [latency] holds the latency settings, a key is read from key_file,
    # task bounds are max_<m>/min_<m> of the task's metrics
    internal = {("evaluation", "latency"), ("watermark", "key"), ("constraints", "task_bounds")}
    assert set(classes) == set(_SECTIONS)
    rows = {}
    for line in (ROOT / "studies" / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("| `[") and "]`" in line:
            rows[line.split("`")[1].strip("[]")] = line
    for section, cls in classes.items():
        assert section in rows, f"studies/README.md has no row for [{section}]"
        row = rows[section]
        missing = [f.name for f in fields(cls) if (section, f.name) not in internal
                   and f"`{f.name}`" not in row and f"`[{section}.{f.name}]`" not in row]   # a key, or a sub-table
        assert not missing, f"[{section}] keys missing from studies/README.md: {missing}"
