"""A task's own metrics, loss and inputs (#19 item 2): declared up front, measured into
``Metrics.values``, trained on by recovery and the gradient-based criteria, named by a
study's objectives and constraints."""

from __future__ import annotations

import pickle

import pytest
import torch

from evaluators.evaluate import evaluate
from evaluators.measure import task_values
from evaluators.metrics import Metrics
from evaluators.settings import EvalSettings
from evaluators.tasks import Task, declared_metrics, load_task
from search.config import ConfigError, StudyConfig
from spaces.policy import Policy
from spaces.space import SearchSpace, SpaceConfig
from tests.metric_tasks import mae, regression_task

FAST = EvalSettings(calibration_samples=32, bn_batches=2, batch_size=16)


@pytest.fixture(scope="module")
def regression():
    task = regression_task()
    space = SearchSpace.from_model(task.base_model(), task.example_inputs, SpaceConfig(ratio_min=0.25))
    return task, space


def test_a_task_declares_its_metrics_without_being_built():
    assert declared_metrics("digits") == {"accuracy": "maximize"}
    assert declared_metrics("masks") == {"iou": "maximize", "mse": "minimize"}
    assert declared_metrics("markov-lm") == {"perplexity": "minimize"}
    assert declared_metrics("tests.metric_tasks:regression_task") == {"mae": "minimize"}
    assert declared_metrics("tests.fakes:tiny_task") == {"accuracy": "maximize"}
    with pytest.raises(ValueError, match="metric name 'MAE' must be lower-case"):
        declared_metrics("tests.metric_tasks:badly_declared_task")


def test_task_fields_are_validated(regression):
    task, _ = regression
    fields = dict(task.__dict__)
    with pytest.raises(ValueError, match="direction of 'mae' must be 'maximize' or 'minimize', got 'down'"):
        Task(**{**fields, "metric_directions": {"mae": "down"}})
    with pytest.raises(ValueError, match="need a metrics function"):
        Task(**{**fields, "metrics": None})
    with pytest.raises(ValueError, match="different sample counts"):
        Task(**{**fields, "train": ((task.train[0][0], task.train[0][1][:3]), task.train[1])})
    with pytest.raises(ValueError, match="loss must be callable"):
        Task(**{**fields, "loss": "l1"})
    with pytest.raises(ValueError, match="scores by .* but declares"):
        load_task("tests.metric_tasks:undeclared_accuracy_task")


def test_batches_keep_the_input_form_and_the_same_samples(regression):
    task, _ = regression
    batches = task.batches("validation", 10, limit=25, seed=3)
    assert [len(y) for _, y in batches] == [10, 10, 5]
    x, y = batches[0]
    assert isinstance(x, tuple) and len(x) == 2 and x[0].shape == (10, 4) and x[1].shape == (10,)
    again = task.batches("validation", 10, limit=25, seed=3)
    assert all(torch.equal(a[0][0], b[0][0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    # every sample keeps its own scale and target: the tuple's tensors are indexed alike
    full_x, full_y = task.validation
    row = int((full_y == y[0]).nonzero()[0])
    assert torch.equal(full_x[1][row], x[1][0])


def test_task_values_are_the_declared_metrics(regression):
    task, _ = regression
    model = task.base_model()
    values = task_values(model, task, task.batches("validation", 16, seed=None))
    assert set(values) == {"mae"} and values["mae"] > 0
    with torch.no_grad():
        assert values == mae(model, task.batches("validation", 16, seed=None))
    wrong = Task(**{**task.__dict__, "metrics": lambda m, b: {"rmse": 1.0}})
    with pytest.raises(ValueError, match=r"metrics returned \['rmse'\], not \['mae'\]"):
        task_values(model, wrong, task.batches("validation", 16))


def test_evaluate_records_the_task_metrics(regression):
    task, space = regression
    metrics = evaluate(space.uniform(0.5), task, FAST, groups=space.groups)
    assert metrics.error is None and metrics.ok
    assert metrics.accuracy is None and set(metrics.values) == {"mae"}
    assert Metrics.from_dict(metrics.to_dict()).values == metrics.values
    assert not Metrics(values={"mae": float("nan")}).ok


def test_finetune_trains_on_the_task_loss(regression):
    """An untrained regressor: fine-tuning on the task's L1 loss lowers its error (the
    default cross-entropy could not even run on float targets)."""
    task, space = regression
    policy = space.uniform(0.75)
    before = evaluate(policy, task, FAST.replace(recovery="none"), groups=space.groups)
    after = evaluate(policy, task, FAST.replace(recovery="finetune", finetune_steps=60, finetune_lr=0.05, kd=False),
                     groups=space.groups)
    assert after.error is None, after.error
    assert after.values["mae"] < 0.8 * before.values["mae"]


@pytest.mark.parametrize("method", ["taylor", "shapley"])
def test_gradient_and_loss_based_criteria_use_the_task_loss(regression, method):
    task, space = regression
    policy = Policy(ratios=space.uniform(0.5).ratios, method=method)
    metrics = evaluate(policy, task, FAST, groups=space.groups)
    assert metrics.error is None, metrics.error
    # not a weight-magnitude ranking in disguise: the kept channels differ from l1's
    l1 = evaluate(Policy(ratios=policy.ratios, method="l1"), task, FAST, groups=space.groups)
    assert metrics.values != l1.values


def test_a_task_with_its_own_metrics_pickles_for_the_workers(tmp_path):
    task = load_task("markov-lm", {"n_samples": 400, "epochs": 2}, cache_dir=tmp_path)
    copy = pickle.loads(pickle.dumps(task))
    batches = task.batches("validation", 32, seed=None)
    assert isinstance(batches[0][0], dict) and set(batches[0][0]) == {"input_ids", "attention_mask"}
    assert task_values(copy.base_model(), copy, batches) == task_values(task.base_model(), task, batches)


def _config(objectives: list[str], constraints: dict, task: str = "tests.metric_tasks:regression_task") -> dict:
    return {"study": {"name": "m", "n_trials": 2, "objectives": objectives}, "task": {"name": task},
            "constraints": constraints, "searchers": [{"kind": "random"}]}


def test_objectives_and_constraints_name_the_task_metrics():
    config = StudyConfig.from_dict(_config(["mae", "flops"], {"max_mae": 0.5, "max_flops_ratio": 0.9}))
    assert config.study.directions == ("minimize", "minimize")
    assert config.constraints.names == ("max_flops_ratio", "max_mae") and config.constraints.max_mae == 0.5
    values = config.constraints.values(Metrics(flops_ratio=0.5, values={"mae": 0.75}))
    assert values == pytest.approx((0.5 - 0.9, 0.75 - 0.5))


@pytest.mark.parametrize("objectives, constraints, match", [
    (["rmse", "flops"], {}, r"unknown objective 'rmse' \(known: .*mae.*; task .* measures mae\)"),
    (["mae", "flops"], {"min_mae": 0.1}, r"unknown key 'min_mae' in \[constraints\]"),
    (["mae", "flops"], {"max_mae": "low"}, r"\[constraints\] max_mae must be a finite number"),
])
def test_bad_task_metric_names_are_one_line_config_errors(objectives, constraints, match):
    with pytest.raises(ConfigError, match=match) as info:
        StudyConfig.from_dict(_config(objectives, constraints))
    assert "\n" not in str(info.value)


def test_a_metric_named_like_a_cost_is_refused():
    with pytest.raises(ConfigError, match="'flops' has the name of a built-in cost objective"):
        StudyConfig.from_dict(_config(["accuracy", "params"], {"max_flops": 0.5}, "tests.metric_tasks:cost_named_task"))


def test_prepare_refuses_a_quality_the_task_does_not_measure(tmp_path):
    from search.setup import prepare

    data = _config(["accuracy", "flops"], {})
    data["study"]["storage"] = f"sqlite:///{tmp_path}/m.db"
    with pytest.raises(ConfigError, match="name 'accuracy', but task .* measures mae"):
        prepare(StudyConfig.from_dict(data))
    assert not (tmp_path / "m.db").exists()


def test_a_study_on_a_task_metric_is_re_judged_when_its_bound_changes(tmp_path):
    """Constraint values of ``max_mae`` are recorded per trial and recomputed by
    ``--allow-changed-constraints`` (search.study_change) from the recorded metric."""
    from search.config import load_config
    from search.runner import run_study
    from search.setup import prepare
    from search.storage import load_records
    from tests.fakes import local_pool, tiny_config

    path = tiny_config(tmp_path, name="reg", n_trials=4, constraints="max_flops_ratio = 0.9\nmax_mae = 5.0")
    text = path.read_text().replace('"tests.fakes:tiny_task"', '"tests.metric_tasks:regression_task"')
    path.write_text(text.replace("[task]", 'objectives = ["mae", "flops"]\n[task]', 1))

    def pool(p, a):
        return local_pool(p.task, p.space, p.config.evaluation)

    run_study(load_config(path), pool_factory=pool, progress=False)
    first = {r.number: r for r in load_records(load_config(path))}
    assert all(set(r.metrics.values) == {"mae"} and r.feasible for r in first.values())
    bound = sorted(r.metrics.values["mae"] for r in first.values())[1]  # some trials now exceed it
    path.write_text(path.read_text().replace("max_mae = 5.0", f"max_mae = {bound}"))
    with pytest.raises(ConfigError, match="max_mae 5 -> "):
        prepare(load_config(path))
    config = load_config(path)
    run_study(config, pool_factory=pool, progress=False, prepared=prepare(config, allow_changed_constraints=True))
    for number, record in first.items():
        again = next(r for r in load_records(config) if r.number == number)
        assert again.constraints["max_mae"] == pytest.approx(record.metrics.values["mae"] - bound)
        assert again.feasible == (record.metrics.values["mae"] <= bound)
